"""A1111's prompt editing, alternation, AND and BREAK: the parser against A1111's own examples, the
token layout, and the engine's conditioning per row and step (against diffusers loops on the tiny model)."""

import pytest
import torch

from deployments.engine.prompt_syntax import (
    PromptPlan,
    parse_prompt_attention,
    plan_prompts,
    prompt_schedule,
    split_and,
)
from deployments.engine.prompts import encode_prompt_schedules, prompt_token_count, tokenize_chunks
from deployments.engine.step_scheduler import DenoiseRequest, composable_guidance

from engine_helpers import Engine, SDXLEngine

# AUTOMATIC1111's doctest table of get_learned_conditioning_prompt_schedules (modules/prompt_parser.py),
# steps = 10, exact.
A1111_SCHEDULES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    # A1111's doctest says [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this right now"), but its code
    # (lark 1.1.2 and 1.3.1 alike) fails to parse it and returns the prompt as text: so do we.
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
]

# Beyond A1111's table: the forms of the brief, fractions, numbers, nesting and malformed input (text).
MORE_SCHEDULES = [
    ("a [cat:dog:0.5]", 4, [(2, "a cat"), (4, "a dog")]),
    ("[cat::0.5] dog", 4, [(2, "cat dog"), (4, " dog")]),
    ("[cat:dog:2]", 4, [(2, "cat"), (4, "dog")]),
    ("[cat:dog:1.0]", 4, [(4, "cat")]),  # "1.0" is a fraction (A1111's default scheduling): the end
    ("[cat:dog:0]", 4, [(4, "dog")]),  # never before
    ("[cat:dog:-1]", 4, [(4, "dog")]),
    ("[cat:dog:9]", 4, [(4, "cat")]),  # capped at the steps
    ("[cat:dog:0.3]", 10, [(3, "cat"), (10, "dog")]),
    ("[cat:dog:0.29]", 100, [(28, "cat"), (100, "dog")]),  # int(0.29 * 100) = 28, as A1111's float
    ("[cat:dog:1e0]", 4, [(1, "cat"), (4, "dog")]),
    ("[a|b|c]", 4, [(1, "a"), (2, "b"), (3, "c"), (4, "a")]),
    ("[a|[b:c:2]]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    ("([cat:dog:2]:1.2)", 4, [(2, "(cat:1.2)"), (4, "(dog:1.2)")]),
    (r"\[cat:dog:2\]", 4, [(4, r"\[cat:dog:2\]")]),  # escaped: text
    ("a | b", 4, [(4, "a | b")]),  # '|' outside alternation: the prompt is text
    ("[cat:dog]", 4, [(4, "[cat:dog]")]),  # no number: text
    ("[cat:dog:x]", 4, [(4, "[cat:dog:x]")]),
    ("[a:b:c:1]", 4, [(4, "[a:b:c:1]")]),  # three colons: text
    ("[a|b:1]", 4, [(4, "[a|b:1]")]),
    ("a ending\\", 4, [(4, "a ending\\")]),
    ("", 3, [(3, "")]),
]


@pytest.mark.parametrize("prompt, want", A1111_SCHEDULES)
def test_a1111_schedule_table(prompt, want):
    assert prompt_schedule(prompt, 10) == want


@pytest.mark.parametrize("prompt, steps, want", MORE_SCHEDULES)
def test_more_schedules(prompt, steps, want):
    assert prompt_schedule(prompt, steps) == want


def test_schedule_parse_is_fast_on_long_prompts():
    # A1111's Earley parser takes about 100 s on this; ours is linear.
    import time

    prompt = "a [b:c:0.5] " * 680  # 8160 characters
    start = time.process_time()
    schedule = prompt_schedule(prompt, 150)
    assert time.process_time() - start < 2.0
    assert [end for end, _ in schedule] == [75, 150]
    deep = "[" * 5000 + "a:b:0.5" + "]" * 5000  # deeper than MAX_BRACKET_DEPTH: text
    assert prompt_schedule(deep, 4) == [(4, deep)]


AND_TABLE = [
    ("a cat :1.2 AND a dog :0.8", [("a cat", 1.2), (" a dog", 0.8)]),
    ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),
    ("a cat:-0.5", [("a cat", -0.5)]),
    ("a cat :.5  ", [("a cat", 0.5)]),
    ("a cat : 2.", [("a cat", 2.0)]),
    ("ratio 16:9 photo", [("ratio 16:9 photo", 1.0)]),
    ("ANDROID and more", [("ANDROID and more", 1.0)]),  # AND must be a word, in capitals
    ("AND", [("", 1.0), ("", 1.0)]),
    ("(cat:1.2)", [("(cat:1.2)", 1.0)]),  # a weight inside brackets is attention, not an AND weight
]


@pytest.mark.parametrize("prompt, want", AND_TABLE)
def test_split_and(prompt, want):
    assert split_and(prompt) == want


def test_plan_keeps_plain_prompts_verbatim():
    plan = plan_prompts("a cat  ", "blurry", 4)
    assert plan == PromptPlan(parts=(((4, "a cat  "),),), weights=(1.0,), negative=((4, "blurry"),))
    assert not plan.scheduled and not plan.composable
    plan = plan_prompts("a [cat:dog:2] AND snow :0.5", "[ugly:blurry:0.5]", 4)
    assert plan.parts == (((2, "a cat"), (4, "a dog")), ((4, " snow"),))  # parts lose trailing spaces
    assert plan.weights == (1.0, 0.5) and plan.negative == ((2, "ugly"), (4, "blurry"))
    assert plan.scheduled and plan.composable
    assert plan_prompts("a cat :1.5", "", 4).composable  # one part with a weight: A1111 weighs its guidance


# -- BREAK: A1111's tokenize_line -------------------------------------------------------------------


def test_break_is_a_marker_fragment():
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert parse_prompt_attention("a BREAKfast") == [("a BREAKfast", 1.0)]  # a word of its own
    assert parse_prompt_attention("a break b") == [("a break b", 1.0)]  # in capitals
    # Inside brackets its marker weight is multiplied: text, as in A1111.
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]


def test_break_token_layout(tiny):
    tok = tiny["tokenizer"]
    ids = {w: tok(w, add_special_tokens=False).input_ids for w in ("a cat", "a dog", "cat")}
    chunks = tokenize_chunks(tok, "a cat BREAK a dog", 75)
    assert [c for c, _ in chunks] == [ids["a cat"], ids["a dog"]]
    assert prompt_token_count(chunks, 75) == 75 + len(ids["a dog"])  # A1111's count: a BREAK'd chunk is full
    # A BREAK at the start ends an empty chunk; one at the end adds none; two in a row make an empty chunk.
    assert [c for c, _ in tokenize_chunks(tok, "BREAK a cat", 75)] == [[], ids["a cat"]]
    assert [c for c, _ in tokenize_chunks(tok, "a cat BREAK", 75)] == [ids["a cat"]]
    assert [c for c, _ in tokenize_chunks(tok, "a cat BREAK BREAK a dog", 75)] == [ids["a cat"], [], ids["a dog"]]
    # 75 tokens fill a chunk; a BREAK right after ends that chunk, with no empty one.
    full = " ".join(["cat"] * 75)
    assert [len(c) for c, _ in tokenize_chunks(tok, full + " BREAK cat", 75)] == [75, 1]
    assert [len(c) for c, _ in tokenize_chunks(tok, full + " cat", 75)] == [75, 1]
    # weights travel with their tokens
    assert tokenize_chunks(tok, "(cat:1.5) BREAK cat", 75) == [(ids["cat"], [1.5]), (ids["cat"], [1.0])]


def test_break_pads_the_chunk_in_the_embedding(tiny):
    """'a cat BREAK a dog' encodes as two 77-token rows: [start, a cat, end, pad...] and [start, a dog, ...]."""
    engine = Engine(tiny)
    (z,) = engine.prompts.encode_prompt(["a cat BREAK a dog"])
    first, second = engine.prompts.encode_prompt(["a cat", "a dog"])
    assert z.shape == (154, 64)
    assert torch.equal(z[:77], first) and torch.equal(z[77:], second)


# -- the engine: what the UNet sees per row and step -----------------------------------------------


def _schedule_request(engine, prompt, negative="", *, steps=4, guidance_scale=7.5, seed=0, size=64, scheduler="euler"):
    (schedule,) = encode_prompt_schedules([engine.prompts], [plan_prompts(prompt, negative, steps)])
    return DenoiseRequest(
        schedule.parts[0].embeds[0],
        schedule.negative.embeds[0],
        size,
        size,
        steps,
        guidance_scale,
        seed,
        scheduler,
        prompt_schedule=schedule,
    )


def _record_contexts(engine):
    """Wrap the scheduler's forward_unet: the encoder_hidden_states of every tick."""
    seen = []
    forward = engine.steps.forward_unet

    def spy(x_in, t_in, context, added, rows):
        seen.append((context.clone(), None if added is None else {k: v.clone() for k, v in added.items()}))
        return forward(x_in, t_in, context, added, rows)

    engine.steps.forward_unet = spy
    return seen


def _encode(engine, text):
    return engine.prompts.encode_prompt([text])[0]


@pytest.mark.parametrize(
    "prompt, negative, rows_per_step",
    [
        # [from:to:when]: switches after step 2 of 4 (A1111: step index <= end_at_step)
        ("a [cat:dog:0.5]", "", [["", "a cat"], ["", "a cat"], ["", "a cat"], ["", "a dog"]]),
        # [to:when] and [from::when]
        ("a [dog:1]", "", [["", "a "], ["", "a "], ["", "a dog"], ["", "a dog"]]),
        ("[cat::2] dog", "", [["", "cat dog"]] * 3 + [["", " dog"]]),
        # alternation: A1111's step 0 and 1 both take the first option (1 is the first entry's end)
        ("[cat|dog]", "", [["", "cat"], ["", "cat"], ["", "dog"], ["", "cat"]]),
        # the negative prompt is scheduled too
        ("a cat", "[ugly:blurry:0.5]", [["ugly", "a cat"]] * 3 + [["blurry", "a cat"]]),
        # AND: a row per part, after the negative's
        ("a cat AND a [dog:fox:0.5] :0.5", "", [["", "a cat", " a dog"]] * 3 + [["", "a cat", " a fox"]]),
    ],
)
def test_rows_see_the_scheduled_encodings(tiny, prompt, negative, rows_per_step):
    engine = Engine(tiny)
    seen = _record_contexts(engine)
    engine.run([_schedule_request(engine, prompt, negative)])
    assert len(seen) == 4
    for (context, _), texts in zip(seen, rows_per_step, strict=True):
        assert context.shape[0] == len(texts)
        for row, text in zip(context, texts, strict=True):
            assert torch.equal(row, _encode(engine, text))


def test_without_guidance_an_edit_is_one_row_and_and_keeps_the_negative(tiny):
    engine = Engine(tiny)
    seen = _record_contexts(engine)
    engine.run([_schedule_request(engine, "[cat:dog:0.5]", guidance_scale=1.0)])
    assert [c.shape[0] for c, _ in seen] == [1] * 4
    assert torch.equal(seen[3][0][0], _encode(engine, "dog"))
    seen.clear()
    engine.run([_schedule_request(engine, "cat AND dog", guidance_scale=1.0)])
    assert [c.shape[0] for c, _ in seen] == [3] * 4  # A1111 always denoises the negative with AND


def test_parts_of_different_lengths_stack_as_a1111(tiny):
    """Shorter AND parts repeat their last token's embedding; the negative pads with empty chunks."""
    engine = Engine(tiny)
    long = " ".join(["cat"] * 80)  # 2 chunks
    (s,) = encode_prompt_schedules([engine.prompts], [plan_prompts(f"{long} AND dog", "blurry", 4)])
    dog, blurry, empty = engine.prompts.encode_prompt(["dog", "blurry", ""])
    assert s.parts[0].embeds.shape == s.parts[1].embeds.shape == s.negative.embeds.shape == (1, 154, 64)
    assert torch.equal(s.parts[1].embeds[0, :77], dog)
    assert torch.equal(s.parts[1].embeds[0, 77:], dog[-1:].expand(77, -1))
    assert torch.equal(s.negative.embeds[0], torch.cat([blurry, empty]))


def _manual_loop(engine, conds_at, *, steps, guidance_scale, seed=0, size=64, weights=None):
    """diffusers' scheduler and UNet, by hand: conds_at(i) -> (negative, [part embeddings]) for step i."""
    scheduler = engine.schedulers.create("euler")
    scheduler.set_timesteps(steps)
    shape = (1, engine.unet.config.in_channels, size // 8, size // 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            negative, parts = conds_at(i)
            context = torch.stack([negative, *parts])
            x_in = scheduler.scale_model_input(torch.cat([latents] * context.shape[0]), t)
            eps = engine.unet(x_in, t, encoder_hidden_states=context).sample
            if weights is None:
                eps_uncond, eps_text = eps.chunk(2)
                guided = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            else:  # composable diffusion, written out in A1111's order (combine_denoised)
                guided = eps[:1].clone()
                for k, w in enumerate(weights):
                    guided += (eps[1 + k : 2 + k] - eps[:1]) * (w * guidance_scale)
            latents = scheduler.step(guided, t, latents).prev_sample
    return latents


def _latents(engine, requests):
    jobs = engine.steps.submit(requests)
    while not engine.steps.idle:
        engine.steps.tick()
    return [j.x_t for j in jobs]


def test_prompt_editing_equals_a_manual_diffusers_loop(tiny):
    engine = Engine(tiny)
    cat, dog, negative = engine.prompts.encode_prompt(["a cat", "a dog", "blurry"])
    # A1111: [a cat:a dog:0.5] over 4 steps is "a cat" at steps 0..2, "a dog" at step 3.
    want = _manual_loop(engine, lambda i: (negative, [cat if i <= 2 else dog]), steps=4, guidance_scale=7.5)
    (got,) = _latents(engine, [_schedule_request(engine, "[a cat:a dog:0.5]", "blurry")])
    assert (got - want).abs().max() <= 1e-4


def test_and_equals_a_manual_composable_loop(tiny):
    engine = Engine(tiny)
    cat, dog, empty = engine.prompts.encode_prompt(["a cat", " a dog", ""])
    want = _manual_loop(engine, lambda i: (empty, [cat, dog]), steps=3, guidance_scale=5.0, weights=(1.2, 0.8))
    (got,) = _latents(engine, [_schedule_request(engine, "a cat :1.2 AND a dog :0.8", steps=3, guidance_scale=5.0)])
    assert (got - want).abs().max() <= 1e-4


def test_composable_guidance_order():
    eps = torch.tensor([[1.0], [3.0], [-1.0]])
    assert composable_guidance(eps, (0.5, 2.0), 3.0).tolist() == [[1.0 + 2.0 * 1.5 + (-2.0) * 6.0]]


def test_mixed_batch_rows_equal_each_alone(tiny):
    engine = Engine(tiny)

    def requests():
        return [
            engine.request("a lighthouse", "blurry", steps=4, seed=1, scheduler="euler"),
            _schedule_request(engine, "a [cat:dog:0.5]", "blurry", seed=2),
            _schedule_request(engine, "a cat AND [fox|owl] :0.7", seed=3),
            _schedule_request(engine, "snow [a|b]", "[x::0.5]", seed=4, guidance_scale=1.0),
        ]

    alone = [_latents(engine, [r])[0] for r in requests()]
    ticks = engine.steps.ticks_run
    together = _latents(engine, requests())
    assert engine.steps.ticks_run - ticks == 4  # one batch: every tick ran all four
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a, b)


def test_plain_requests_keep_their_tensors(tiny):
    """No syntax: the plan is not scheduled, and the pair path encodes exactly as before."""
    engine = Engine(tiny)
    plan = plan_prompts("a (cat:1.2), photo", "blurry", 4)
    assert not plan.scheduled
    request = engine.request("a (cat:1.2), photo", "blurry", steps=4)
    assert request.prompt_schedule is None
    job = engine.steps.prepare(request)
    assert job.row_conditioning is None and job.rows == 2


@pytest.mark.parametrize("scheduler, steps_of_calls", [("default", [0, 0, 1, 2, 3]), ("heun", [0, 0, 1, 1, 2, 2, 3])])
def test_samplers_with_more_calls_than_steps(tiny, scheduler, steps_of_calls):
    """PLMS (the tiny model's default) makes an extra first call, Heun two per step: calls share steps."""
    engine = Engine(tiny)
    seen = _record_contexts(engine)
    engine.run([_schedule_request(engine, "[a|b|c|d]", scheduler=scheduler)])
    options = {text: _encode(engine, text) for text in "abcd"}
    assert len(seen) == len(steps_of_calls)
    for (context, _), step in zip(seen, steps_of_calls, strict=True):
        # A1111's alternation entries end at steps 1, 2, 3, 4: step 0 and 1 take "a", then b, c, d.
        assert torch.equal(context[1], options["aabc"[step]])


def test_too_many_rows_for_a_tick_is_refused(tiny):
    engine = Engine(tiny, max_rows_per_tick=4)
    with pytest.raises(ValueError, match=r"4 AND parts takes 5 UNet rows.*max_rows_per_tick is 4"):
        engine.steps.submit([_schedule_request(engine, "a AND b AND c AND d")])


def test_sdxl_pooled_embeddings_follow_the_schedule(tiny_sdxl):
    engine = SDXLEngine(tiny_sdxl)
    seen = _record_contexts(engine)
    first, second = engine.prompts.encoders
    plan = plan_prompts("a [cat:dog:0.5] AND snow", "blurry", 4)
    (s,) = encode_prompt_schedules(
        [first, second], [plan], zeros_for_empty_negative=engine.info.force_zeros_for_empty_prompt
    )
    ids = (64, 64, 0, 0, 64, 64)
    request = DenoiseRequest(
        s.parts[0].embeds[0],
        s.negative.embeds[0],
        64,
        64,
        4,
        6.0,
        0,
        pooled_prompt_embeds=s.parts[0].pooled[0],
        negative_pooled_prompt_embeds=s.negative.pooled[0],
        add_time_ids=ids,
        negative_add_time_ids=ids,
        prompt_schedule=s,
    )
    engine.run_latents([request])
    pairs = {
        t: e
        for t, e in zip(
            ["a cat", "a dog", " snow", "blurry"],
            engine.prompts.encode_prompt_pairs(["a cat", "a dog", " snow", "blurry"], ["", "", "", ""]),
            strict=True,
        )
    }
    for step, (context, added) in enumerate(seen):
        texts = ["blurry", "a cat" if step <= 2 else "a dog", " snow"]
        for row, text in enumerate(texts):
            assert torch.equal(context[row], pairs[text].prompt_embeds)
            assert torch.equal(added["text_embeds"][row], pairs[text].pooled_prompt_embeds)
