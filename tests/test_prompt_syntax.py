"""A1111's prompt syntax: attention weights and <lora:...> tags (pure functions, tables), and how the
planner turns tags into the request's adapters and limits prompts in 75-token chunks."""

import pytest

from deployments.engine.config import LoRAConfig
from deployments.engine.prompt_syntax import LoraTag, extract_lora_tags, parse_prompt_attention
from graph.adapters_api import Adapters
from graph.config import LimitsConfig
from graph.errors import APIError, FieldError
from graph.planning import Planner
from graph.schemas import LoRASpec
from graph.validation import FieldNames, GenerationInput

W = 1.1
# AUTOMATIC1111's own examples (modules/prompt_parser.py docstring), then nesting, numbers and edge cases.
ATTENTION = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    # explicit weights: whitespace, signs, leading dot, zero
    ("(cat:1.3)", [("cat", 1.3)]),
    ("(cat: 0.5 )", [("cat", 0.5)]),
    ("(cat:.5)", [("cat", 0.5)]),
    ("(cat:-1)", [("cat", -1.0)]),
    ("(cat:0)", [("cat", 0.0)]),
    ("(cat:1.0) dog", [("cat dog", 1.0)]),  # weight 1.0 merges with its neighbours
    # nesting multiplies
    ("((cat))", [("cat", W * W)]),
    ("[[cat]]", [("cat", (1 / W) * (1 / W))]),
    ("([cat])", [("cat", (1 / W) * W)]),
    ("((cat:2) dog)", [("cat", 2 * W), (" dog", W)]),
    ("(a [b (c:3)])", [("a ", W), ("b ", W / W), ("c", 3 * W / W)]),
    # escapes are literal brackets, a lone backslash vanishes, a doubled one is one backslash
    (r"\(cat\) \[dog\]", [("(cat) [dog]", 1.0)]),
    (r"(a \) b)", [("a ) b", 1.1)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    # unbalanced: an open bracket runs to the end, a stray closer is text
    ("a [b", [("a ", 1.0), ("b", 1 / W)]),
    ("a ) b ]", [("a ) b ]", 1.0)]),
    ("cat:1.2)", [("cat:1.2)", 1.0)]),
    # a colon that is no weight is text
    ("(time: noon)", [("time: noon", 1.1)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    # BREAK is a chunk boundary marker (A1111's ("BREAK", -1)); only the capitalised word
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a Break b", [("a Break b", 1.0)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
]


@pytest.mark.parametrize("text, expected", ATTENTION)
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_a1111_arithmetic_is_bit_exact():
    # The same multiplications in the same order as A1111: equal floats, not just close ones.
    got = dict(parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert got["house"] == 1.5730000000000004 and got["sky"] == 1.4641000000000006


@pytest.mark.parametrize("text", ["(cat:1.2.3)", "(cat:.)", "(cat:-.)"])
def test_malformed_attention_weight_raises_naming_it(text):
    with pytest.raises(ValueError, match="invalid attention weight"):
        parse_prompt_attention(text)


LORA_TAGS = [
    ("a harbour <lora:ink:0.8>", "a harbour ", [LoraTag("ink", None, 0.8)]),
    ("<lora:ink>a harbour", "a harbour", [LoraTag("ink", None, 1.0)]),
    ("x <lora:ink@3:0.8>", "x ", [LoraTag("ink", 3, 0.8)]),
    ("x <lora:ink@12>", "x ", [LoraTag("ink", 12, 1.0)]),
    ("x <lora: ink : .5 >", "x ", [LoraTag("ink", None, 0.5)]),
    ("x <lora:civitai-style_v2:1>", "x ", [LoraTag("civitai-style_v2", None, 1.0)]),
    (
        "<lora:a:0.5>, (cat:1.2), <lora:b@2:1.5>",
        ", (cat:1.2), ",
        [LoraTag("a", None, 0.5), LoraTag("b", 2, 1.5)],
    ),
    ("<lora:a:-1>", "", [LoraTag("a", None, -1.0)]),  # the range is the planner's business
    ("no tags <hypernet:x:1> <b>", "no tags <hypernet:x:1> <b>", []),  # other tags stay text
    ("<LORA:x:1>", "<LORA:x:1>", []),  # the type is case-sensitive, as in A1111
]


@pytest.mark.parametrize("prompt, text, tags", LORA_TAGS)
def test_extract_lora_tags(prompt, text, tags):
    assert extract_lora_tags(prompt) == (text, tags)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a <lora:ink:abc>", r"<lora:ink:abc>: the weight must be a number, got 'abc'"),
        ("a <lora:ink:1.2.3>", r"<lora:ink:1\.2\.3>: the weight must be a number"),
        ("a <lora:ink:nan>", r"<lora:ink:nan>: the weight must be a number"),
        ("a <lora:ink:>", r"<lora:ink:>: the weight must be a number, got ''"),
        ("a <lora::1>", r"<lora::1>: the adapter name is missing"),
        ("a <lora:>", r"<lora:>: the adapter name is missing"),
        ("a <lora:ink@x:1>", r"<lora:ink@x:1>: the version after '@' must be a whole number >= 1, got 'x'"),
        ("a <lora:ink@0>", r"<lora:ink@0>: the version after '@' must be a whole number >= 1"),
        ("a <lora:ink:0.8:0.5>", r"<lora:ink:0\.8:0\.5>: expected <lora:name:weight>"),
    ],
)
def test_malformed_lora_tag_raises_naming_it(prompt, message):
    with pytest.raises(ValueError, match=message):
        extract_lora_tags(prompt)


# ---- The planner: tags become the request's adapters; the length limit counts chunks ---------------------


class FakeResolver:
    """Adapters ``ink`` (UNet + text encoder) and ``pastel`` (UNet), both at version 1."""

    lora = LoRAConfig(max_loras_per_request=3)
    known = {"ink": True, "pastel": False}  # name -> has text-encoder weights

    def resolve(self, loras, field="loras", indexed=True):
        unet, text, applied = [], [], []
        for i, spec in enumerate(loras):
            if spec.name not in self.known or spec.version not in (None, 1):
                where = f"{field}[{i}]" if indexed else field
                raise FieldError(404, "adapter_not_found", where, "unknown adapter {name!r}", name=spec.name)
            ref = f"{spec.name}@1"
            applied.append((ref, spec.scale))
            unet.append((ref, spec.scale))
            if self.known[spec.name]:
                text.append((ref, spec.scale))
        return Adapters(tuple(unet), tuple(text), tuple(applied))


@pytest.fixture
def planner(tiny):
    return Planner(tiny["info"], "tiny-sd", LimitsConfig(max_prompt_chunks=2), tiny["tokenizer"], FakeResolver())


def plan(planner, prompt, negative_prompt="", loras=()):
    request = GenerationInput(prompt, negative_prompt, width=64, height=64, steps=4, seed=1, loras=tuple(loras))
    return planner.check_inputs(request)


def test_planner_moves_lora_tags_after_the_bodys_loras(planner):
    p = plan(planner, "a (harbour:1.2) <lora:ink:0.8>", loras=[LoRASpec(name="pastel", scale=0.5)])
    assert p.prompt == "a (harbour:1.2) "  # tags removed, weighting left for the TextEncoder
    assert p.applied == (("pastel@1", 0.5), ("ink@1", 0.8))
    assert p.unet_adapters == (("pastel@1", 0.5), ("ink@1", 0.8))
    assert p.text_adapters == (("ink@1", 0.8),)


def test_lora_tags_in_the_negative_prompt_stay_text(planner):
    p = plan(planner, "a harbour", negative_prompt="<lora:ink:1>")
    assert p.negative_prompt == "<lora:ink:1>" and p.applied == ()


@pytest.mark.parametrize(
    "prompt, loras, status, code, message",
    [
        ("x <lora:missing:1>", [], 404, "adapter_not_found", "'missing'"),
        ("x <lora:ink:abc>", [], 422, "invalid_value", "<lora:ink:abc>: the weight must be a number"),
        ("x <lora:ink:5>", [], 422, "invalid_value", r"<lora:ink:5>: the weight must be in \[0, 4.0\]"),
        ("x <lora:ink:-1>", [], 422, "invalid_value", "the weight must be in"),
        ("x <lora:ink>", [LoRASpec(name="ink")], 422, "invalid_value", "ink@1 is both in loras and a <lora"),
        (
            "<lora:ink> <lora:pastel>",
            [LoRASpec(name="pastel", scale=0.5), LoRASpec(name="ink")],
            422,
            "invalid_value",
            "at most 3 adapters per request",
        ),
        ("(cat:1.2.3)", [], 422, "invalid_value", "invalid attention weight '1.2.3'"),
    ],
)
def test_bad_tags_are_errors_on_the_prompt_field(planner, prompt, loras, status, code, message):
    with pytest.raises(APIError, match=message) as e:
        plan(planner, prompt, loras=loras)
    assert (e.value.status, e.value.code, e.value.field) == (status, code, "prompt")


def test_prompt_length_is_limited_in_chunks(planner):
    assert plan(planner, "cat " * 150).prompt == "cat " * 150  # 150 tokens: two chunks of 75
    with pytest.raises(APIError) as e:
        plan(planner, "cat " * 151)
    assert (e.value.status, e.value.code, e.value.field) == (422, "prompt_too_long", "prompt")
    assert e.value.message.startswith("prompt is 151 tokens; the limit is 150 tokens (2 chunks of 75")
    with pytest.raises(APIError) as e:
        plan(planner, "x", negative_prompt="(dog:1.3) " * 151)  # the syntax itself costs no tokens
    assert (e.value.code, e.value.field) == ("prompt_too_long", "negative_prompt")
    assert "151 tokens" in e.value.message
    # tags cost nothing either: they are removed before counting
    assert plan(planner, "cat " * 150 + "<lora:ink:0.5>").applied == (("ink@1", 0.5),)


def test_prompt_schedules_and_break_are_limited_per_text(planner):
    """Each text a prompt takes over its steps is limited, not the prompt string; BREAK ends a chunk."""
    edit = "[" + "cat " * 150 + ":" + "dog " * 150 + ":0.5]"  # 300 tokens of source, 150 at any step
    assert plan(planner, edit).prompt == edit
    with pytest.raises(APIError) as e:
        plan(planner, "[" + "cat " * 151 + "|dog]")
    assert (e.value.code, e.value.field) == ("prompt_too_long", "prompt")
    with pytest.raises(APIError) as e:
        plan(planner, "cat BREAK cat BREAK cat")  # three chunks
    assert e.value.message.startswith("prompt is 151 tokens; the limit is 150 tokens")
    with pytest.raises(APIError) as e:
        plan(planner, "x", negative_prompt="[a:" + "dog " * 151 + ":0.5]")
    assert (e.value.code, e.value.field) == ("prompt_too_long", "negative_prompt")


def test_and_parts_are_limited_naming_prompt_and_the_limit(planner):
    assert plan(planner, " AND ".join(["cat"] * 8)).prompt == " AND ".join(["cat"] * 8)
    with pytest.raises(APIError) as e:
        plan(planner, " AND ".join(["cat"] * 9))
    assert (e.value.status, e.value.code, e.value.field) == (422, "invalid_value", "prompt")
    assert e.value.message == "prompt has 9 AND parts; the limit is 8 (limits.max_prompt_and_parts)"
    # AND in the negative prompt is text (as in A1111): no limit
    assert plan(planner, "x", negative_prompt=" AND ".join(["cat"] * 9)).negative_prompt.count("AND") == 8


@pytest.mark.parametrize("prompt", ["a [unbalanced", "[a:b]", "a | b", "((a][:b:c", "a\\", "[a|b:1]", "]]]::(("])
def test_malformed_schedule_syntax_is_text_not_an_error(planner, prompt):
    assert plan(planner, prompt).prompt == prompt


def test_an_endpoint_names_the_prompt_fields_its_own_way(planner):
    names = FieldNames({"prompt": "input", "negative_prompt": "negative"})
    with pytest.raises(FieldError) as e:
        plan(planner, "x <lora:missing>")
    assert names.translate(e.value).field == "input"
    with pytest.raises(FieldError) as e:
        plan(planner, "x", negative_prompt="y " * 200)
    error = names.translate(e.value)
    assert error.field == "negative" and error.message.startswith("negative is 200 tokens")


def test_max_prompt_chunks_is_checked_at_start_naming_the_field():
    from graph.config import AppConfig, ConfigError

    assert LimitsConfig().max_prompt_chunks == 3
    with pytest.raises(ConfigError, match="limits.max_prompt_chunks"):
        AppConfig.load({"limits": {"max_prompt_chunks": 0}})
