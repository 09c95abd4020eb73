"""Prompt tokenisation and CLIP encoding, with an LRU cache of embeddings.

A prompt is tokenised as AUTOMATIC1111 does it: the attention syntax (``prompt_syntax``) gives
each token a weight, and the tokens are cut into chunks of ``model_max_length - 2`` (75 for CLIP),
each encoded as its own ``[start, tokens..., end, pad...]`` row of ``model_max_length`` (77) and
concatenated, so prompts longer than CLIP's context keep all their words. ``BREAK`` ends a chunk
early: the rest of it is padding (``tokenize_chunks``).

Prompt editing, alternation and AND (``prompt_syntax.plan_prompts``) make a request's conditioning
a schedule over its steps: ``encode_prompt_schedules`` encodes every distinct text of it once and
pads them to one token count as A1111 does (``PromptSchedule`` in ``messages``).

For an unweighted prompt of at most 75 tokens this is exactly diffusers'
``StableDiffusionPipeline.encode_prompt`` (pad to the context, take the last hidden state), so an
embedding made here equals the pipeline's for the same text.

SDXL (``SDXLPromptEncoder``) runs two such encoders, as ``StableDiffusionXLPipeline.encode_prompt``
does: each one's penultimate hidden states (``hidden_states[-2]``), concatenated on the hidden
axis, and the pooled (projected) output of the second for the first chunk. Weighting applies to
each encoder's states before the concatenation, as A1111 does for SDXL.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .prompt_syntax import BREAK_WEIGHT, PromptPlan, Schedule, parse_prompt_attention

TokenIds = tuple[int, ...]
# An adapter set as the text encoder sees it: ((slot, weight, identity), ...). The identity
# (e.g. "name@version") keys the cache, since slots are reused for other adapters.
TextAdapters = tuple[tuple[int, float, str], ...]


def count_tokens(tokenizer, text: str) -> int:
    """Tokens ``text`` takes in the encoder's context, start and end tokens included (no weighting syntax)."""
    return len(tokenizer(text, truncation=False).input_ids)


def _is_break(fragment: tuple[str, float]) -> bool:
    return fragment[0] == "BREAK" and fragment[1] == BREAK_WEIGHT


def tokenize_weighted(tokenizer, text: str) -> tuple[list[int], list[float]]:
    """Token ids of ``text`` without start/end tokens, and one weight per token (BREAK takes none).

    Raises ``ValueError`` for a malformed attention weight. Example: ``"a (cat:1.3)"`` ->
    ``([320, 2368], [1.0, 1.3])``.
    """
    fragments = parse_prompt_attention(text)
    per_fragment = tokenizer([t for t, _ in fragments], add_special_tokens=False, truncation=False).input_ids
    ids: list[int] = []
    weights: list[float] = []
    for fragment, fragment_ids in zip(fragments, per_fragment, strict=True):
        if not _is_break(fragment):
            ids += fragment_ids
            weights += [fragment[1]] * len(fragment_ids)
    return ids, weights


def tokenize_chunks(tokenizer, text: str, chunk_length: int) -> list[tuple[list[int], list[float]]]:
    """``text`` cut into chunks of at most ``chunk_length`` tokens: ``[(ids, weights), ...]``, no start/end.

    A1111's ``FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`` (without its comma backtracking
    and textual-inversion embeddings): a chunk ends when full or at ``BREAK``; a BREAK ends the
    current chunk even if it is empty (``"BREAK a"`` is an empty chunk, then ``a``); an empty
    prompt is one empty chunk. Without BREAK this is ``ceil(tokens / chunk_length)`` chunks.

    >>> from deployments.engine.clip_vocab import builtin_tokenizer   # doctest: +SKIP
    >>> [ids for ids, _ in tokenize_chunks(tokenizer, "a cat BREAK a dog", 75)]   # doctest: +SKIP
    [[320, 2368], [320, 1929]]
    """
    fragments = parse_prompt_attention(text)
    per_fragment = tokenizer([t for t, _ in fragments], add_special_tokens=False, truncation=False).input_ids
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    for fragment, fragment_ids in zip(fragments, per_fragment, strict=True):
        if _is_break(fragment):
            chunks.append((ids, weights))
            ids, weights = [], []
            continue
        for token in fragment_ids:
            if len(ids) == chunk_length:
                chunks.append((ids, weights))
                ids, weights = [], []
            ids.append(token)
            weights.append(fragment[1])
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def prompt_token_count(chunks: list[tuple[list[int], list[float]]], chunk_length: int) -> int:
    """A1111's token count of a tokenized prompt: every chunk but the last counts as full."""
    return chunk_length * (len(chunks) - 1) + len(chunks[-1][0])


def chunk_count(n_tokens: int, chunk_length: int) -> int:
    """Chunks a prompt of ``n_tokens`` (no start/end tokens) takes; an empty prompt takes one."""
    return max(1, math.ceil(n_tokens / chunk_length))


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt ready for the encoder: hashable, so it keys the embedding cache."""

    chunks: tuple[TokenIds, ...]  # k rows of model_max_length ids: start, <= 75 tokens, end, padding
    weights: tuple[float, ...] | None  # [k * model_max_length], one per position; None: all 1.0

    def padded(self, n_chunks: int, empty: TokenIds) -> TokenizedPrompt:
        """This prompt with ``empty`` chunks appended up to ``n_chunks`` (A1111's pad_cond)."""
        extra = n_chunks - len(self.chunks)
        if extra <= 0:
            return self
        weights = None if self.weights is None else self.weights + (1.0,) * (extra * len(empty))
        return TokenizedPrompt(self.chunks + (empty,) * extra, weights)


# A chunk mean smaller than this fraction of the chunk's mean magnitude is treated as zero: float32
# rounding alone leaves means of about 1e-7 of it, while real CLIP embeddings have means of a few
# percent of it (random-weight encoders, whose final LayerNorm has no bias, have a mean of exactly 0).
MEAN_RESTORE_MIN_RATIO = 1e-4


def apply_prompt_weights(z: torch.Tensor, weights: torch.Tensor, chunk_length: int) -> torch.Tensor:
    """A1111's emphasis: scale each token's embedding by its weight, then restore each chunk's mean.

    ``z``: ``[k * chunk_length, hidden]``; ``weights``: ``[k * chunk_length]``. Per chunk,
    ``z_c * w_c[:, None] * (mean(z_c) / mean(z_c * w_c[:, None]))``, in float32, as A1111's
    ``process_tokens`` does.

    A1111 divides by the weighted mean unguarded: where that mean is 0 its result is inf or NaN,
    and where either mean is lost in float32 rounding the "restoring" factor is noise (on a
    random-weight encoder it is anything from 0 to inf, and differs between CPUs). So a chunk
    whose original or weighted mean is below ``MEAN_RESTORE_MIN_RATIO`` times its mean magnitude
    keeps its weighted embedding as is (factor 1). Real CLIP embeddings are never near that
    bound, so for them this is exactly A1111's arithmetic.

    >>> apply_prompt_weights(torch.tensor([[2.0], [4.0]]), torch.tensor([1.0, 0.5]), 2)
    tensor([[3.],
            [3.]])
    """
    hidden = z.shape[-1]
    z32 = z.float().reshape(-1, chunk_length, hidden)  # [k, chunk_length, hidden]
    w = weights.to(z32.device, torch.float32).reshape(-1, chunk_length, 1)  # [k, chunk_length, 1]
    original_mean = z32.mean(dim=(1, 2), keepdim=True)  # [k, 1, 1]
    weighted = z32 * w
    new_mean = weighted.mean(dim=(1, 2), keepdim=True)
    meaningful = (original_mean.abs() >= MEAN_RESTORE_MIN_RATIO * z32.abs().mean(dim=(1, 2), keepdim=True)) & (
        new_mean.abs() >= MEAN_RESTORE_MIN_RATIO * weighted.abs().mean(dim=(1, 2), keepdim=True)
    )
    ratio = torch.where(meaningful, original_mean / torch.where(meaningful, new_mean, 1.0), 1.0)
    return (weighted * ratio).to(z.dtype).reshape(-1, hidden)


class EmbeddingCache:
    """A thread-safe LRU of prompt embeddings keyed by token ids, weights and the adapter set."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> object | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple, value: object) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


HIDDEN_LAYERS = ("last", "penultimate")


class PromptEncoder:
    """Tokenizes and encodes prompts in batches; repeated prompts come from the cache.

    ``hidden_layer``: ``"last"`` (the final LayerNorm's output: SD 1.x / 2.x) or
    ``"penultimate"`` (``hidden_states[-2]``, without the final LayerNorm: each of SDXL's
    encoders). ``pooled``: also return the pooled, projected output (``text_embeds`` of a
    ``CLIPTextModelWithProjection``: SDXL's second encoder) of each prompt's first chunk.

    ``rowwise``: run the text encoder one 77-token row per call, so that an
    embedding never depends on the prompts encoded with it (batch invariance
    by construction, as ``batch_invariance`` explains; the deployments set it
    in deterministic mode). A row's call is then exactly the one diffusers'
    ``encode_prompt`` makes for a single prompt.
    """

    def __init__(
        self,
        tokenizer,
        text_encoder,
        cache_size: int = 1024,
        lora=None,
        rowwise: bool = False,
        *,
        hidden_layer: str = "last",
        pooled: bool = False,
    ):
        if hidden_layer not in HIDDEN_LAYERS:
            raise ValueError(f"hidden_layer must be one of {HIDDEN_LAYERS}, got {hidden_layer!r}")
        self.hidden_layer = hidden_layer
        self.pooled = pooled
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.lora = lora  # a MultiLoRAModel over ``text_encoder``, or None
        self.rowwise = rowwise
        self.cache = EmbeddingCache(cache_size)
        self.max_length = tokenizer.model_max_length  # 77 for CLIP
        self.chunk_length = self.max_length - 2  # tokens per chunk, between the start and end tokens
        pad = tokenizer.pad_token_id
        self.pad_id = tokenizer.eos_token_id if pad is None else pad
        self.empty_chunk = self._chunk([])

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def _chunk(self, ids: list[int]) -> TokenIds:
        row = [self.tokenizer.bos_token_id, *ids, self.tokenizer.eos_token_id]
        return tuple(row + [self.pad_id] * (self.max_length - len(row)))

    def tokenize(self, texts: list[str]) -> list[TokenizedPrompt]:
        """Parse the weighting syntax and cut each text into chunks of ``chunk_length`` tokens."""
        out = []
        for text in texts:
            pieces = tokenize_chunks(self.tokenizer, text, self.chunk_length)
            chunks = tuple(self._chunk(ids) for ids, _ in pieces)
            per_position = None
            if any(w != 1.0 for _, weights in pieces for w in weights):
                per_position = []
                for _, part in pieces:
                    per_position += [1.0, *part] + [1.0] * (self.max_length - 1 - len(part))
            out.append(TokenizedPrompt(chunks, None if per_position is None else tuple(per_position)))
        return out

    def encode_prompt(self, texts: list[str], adapters: list[TextAdapters] | None = None) -> list[torch.Tensor]:
        """One embedding ``[k * max_length, hidden]`` per text (k chunks); uncached texts share one forward.

        ``adapters[i]`` are the text-encoder LoRAs for ``texts[i]`` (resident slots of ``self.lora``).
        """
        return self.encode_tokenized(self.tokenize(texts), adapters)

    def encode_prompt_pairs(
        self, prompts: list[str], negatives: list[str], adapters: list[TextAdapters] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(positive, negative)`` embeddings per request, with the same chunk count.

        Classifier-free guidance stacks the two into one UNet batch, so the shorter one is padded
        with encoded empty chunks, as A1111 does. ``adapters[i]`` apply to both of request i.
        """
        adapters = adapters or [()] * len(prompts)
        pos = self.tokenize(prompts)
        neg = self.tokenize(negatives)
        for i, (p, n) in enumerate(zip(pos, neg, strict=True)):
            k = max(len(p.chunks), len(n.chunks))
            pos[i], neg[i] = p.padded(k, self.empty_chunk), n.padded(k, self.empty_chunk)
        embeds = self.encode_tokenized(pos + neg, list(adapters) * 2)
        m = len(prompts)
        return [(embeds[i], embeds[m + i]) for i in range(m)]

    def encode_tokenized(
        self, prompts: list[TokenizedPrompt], adapters: list[TextAdapters] | None = None
    ) -> list[torch.Tensor]:
        """One embedding ``[k * max_length, hidden]`` per tokenized prompt."""
        return [z for z, _ in self.encode_tokenized_pooled(prompts, adapters)]

    @torch.inference_mode()
    def encode_tokenized_pooled(
        self, prompts: list[TokenizedPrompt], adapters: list[TextAdapters] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(embedding [k * max_length, hidden], pooled [projection] or None)`` per tokenized prompt."""
        adapters = adapters or [()] * len(prompts)
        keys = [(p, tuple((ident, w) for _, w, ident in a)) for p, a in zip(prompts, adapters, strict=True)]
        out: list[tuple | None] = [self.cache.get(k) for k in keys]
        todo: dict[tuple, TextAdapters] = {}
        for k, a, e in zip(keys, adapters, out, strict=True):
            if e is None:
                todo.setdefault(k, a)
        if not todo:
            return out  # type: ignore[return-value]
        # One CLIP row per distinct (chunk, adapter set): every chunk of every prompt in one forward.
        rows: dict[tuple, int] = {}
        routing: list[tuple[tuple[int, float], ...]] = []
        for (prompt, adapter_key), a in todo.items():
            for chunk in prompt.chunks:
                if (chunk, adapter_key) not in rows:
                    rows[(chunk, adapter_key)] = len(rows)
                    routing.append(tuple((slot, w) for slot, w, _ in a))
        input_ids = torch.tensor([chunk for chunk, _ in rows], device=self.device)  # [m, max_length]
        if self.rowwise:
            parts = [self._forward(input_ids[i : i + 1], routing[i : i + 1]) for i in range(len(rows))]
            hidden = torch.cat([h for h, _ in parts])
            pooled = torch.cat([p for _, p in parts]) if self.pooled else None
        else:
            hidden, pooled = self._forward(input_ids, routing)  # [m, max_length, hidden], [m, projection]
        fresh = {}
        for prompt, adapter_key in todo:
            # torch.cat copies, so a cached embedding never keeps the whole batch alive.
            z = torch.cat([hidden[rows[(chunk, adapter_key)]] for chunk in prompt.chunks])  # [k*max_length, hidden]
            if prompt.weights is not None:
                z = apply_prompt_weights(z, torch.tensor(prompt.weights), self.max_length)
            first = None if pooled is None else pooled[rows[(prompt.chunks[0], adapter_key)]].clone()  # [projection]
            fresh[(prompt, adapter_key)] = (z, first)
            self.cache.put((prompt, adapter_key), (z, first))
        return [e if e is not None else fresh[k] for k, e in zip(keys, out, strict=True)]

    def _forward(
        self, input_ids: torch.Tensor, routing: list[tuple[tuple[int, float], ...]]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(hidden [rows, max_length, hidden], pooled [rows, projection] or None)`` for ``input_ids``."""
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = (input_ids != self.pad_id).long()
        penultimate = self.hidden_layer == "penultimate"
        if self.lora is not None and any(routing):
            with self.lora.routed(routing):
                out = self.text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=penultimate)
        else:
            out = self.text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=penultimate)
        hidden = out.hidden_states[-2] if penultimate else out[0]
        return hidden, (out.text_embeds if self.pooled else None)


@dataclass(frozen=True)
class SDXLEmbeddings:
    """One request's SDXL conditioning; the two embeddings have the same chunk count."""

    prompt_embeds: torch.Tensor  # [k * 77, hidden_1 + hidden_2]
    negative_prompt_embeds: torch.Tensor  # [k * 77, hidden_1 + hidden_2]
    pooled_prompt_embeds: torch.Tensor  # [projection_2]
    negative_pooled_prompt_embeds: torch.Tensor  # [projection_2]


class SDXLPromptEncoder:
    """SDXL's two text encoders, as ``StableDiffusionXLPipeline.encode_prompt`` uses them.

    ``first``: ``CLIPTextModel`` (CLIP ViT-L), ``second``: ``CLIPTextModelWithProjection``
    (OpenCLIP bigG), both ``PromptEncoder`` s with ``hidden_layer="penultimate"`` (the second with
    ``pooled=True``). With ``force_zeros_for_empty_prompt`` (SDXL base's ``model_index.json``), an
    empty negative prompt is all zeros, embeddings and pooled alike, as diffusers does when no
    negative prompt is given; a non-empty one is encoded.
    """

    def __init__(self, first: PromptEncoder, second: PromptEncoder, *, force_zeros_for_empty_prompt: bool):
        if first.hidden_layer != "penultimate" or second.hidden_layer != "penultimate" or not second.pooled:
            raise ValueError("SDXL encodes with both encoders' penultimate states and the second one's pooled output")
        self.encoders = (first, second)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    def encode_prompt_pairs(
        self,
        prompts: list[str],
        negatives: list[str],
        adapters: list[TextAdapters] | None = None,
        adapters_2: list[TextAdapters] | None = None,
    ) -> list[SDXLEmbeddings]:
        """Per request, positive and negative conditioning with the same chunk count.

        ``adapters[i]`` / ``adapters_2[i]`` are request i's LoRAs on the first / second encoder.
        """
        m = len(prompts)
        routing = (adapters or [()] * m, adapters_2 or [()] * m)
        zero = [self.force_zeros_for_empty_prompt and n == "" for n in negatives]
        tokenized = []
        for encoder in self.encoders:
            pos, neg = encoder.tokenize(prompts), encoder.tokenize(negatives)
            tokenized.append((pos, neg))
        for i in range(m):  # both tokenizers share CLIP's vocabulary: the same text takes the same chunks
            k = max(len(t[side][i].chunks) for t in tokenized for side in (0, 1))
            for encoder, t in zip(self.encoders, tokenized, strict=True):
                t[0][i], t[1][i] = t[0][i].padded(k, encoder.empty_chunk), t[1][i].padded(k, encoder.empty_chunk)
        per_encoder = []
        for encoder, (pos, neg), a in zip(self.encoders, tokenized, routing, strict=True):
            wanted = [n for n, z in zip(neg, zero, strict=True) if not z]
            wanted_adapters = [x for x, z in zip(a, zero, strict=True) if not z]
            encoded = encoder.encode_tokenized_pooled(pos + wanted, list(a) + wanted_adapters)
            positives, negatives_iter = encoded[:m], iter(encoded[m:])
            per_encoder.append([(p, None if z else next(negatives_iter)) for p, z in zip(positives, zero, strict=True)])
        out = []
        for (p1, n1), (p2, n2) in zip(*per_encoder, strict=True):
            pos_embeds = torch.cat([p1[0], p2[0]], dim=-1)  # [k*77, hidden_1 + hidden_2]
            pooled = p2[1]
            if n1 is None:
                neg_embeds, neg_pooled = torch.zeros_like(pos_embeds), torch.zeros_like(pooled)
            else:
                neg_embeds, neg_pooled = torch.cat([n1[0], n2[0]], dim=-1), n2[1]
            out.append(SDXLEmbeddings(pos_embeds, neg_embeds, pooled, neg_pooled))
        return out


# -- prompt editing, alternation and AND: a request's conditioning per step ----------------------------


@dataclass(frozen=True)
class ScheduledConditioning:
    """One prompt's conditioning over the sampling steps (A1111's list of ``ScheduledPromptConditioning``).

    Entry i applies at the steps ``ends[i - 1] < step <= ends[i]`` (steps counted from 0, as A1111's
    sampler compares its step index with ``end_at_step``); past the last end, entry 0 (A1111's
    fallback). Every entry has the same token count, so a row can switch entries between steps.
    """

    ends: tuple[int, ...]  # end_at_step per entry, ascending
    embeds: torch.Tensor  # [entries, tokens, hidden]
    pooled: torch.Tensor | None = None  # [entries, pooled]; SDXL only

    def entry_at(self, step: int) -> int:
        """The entry in force at sampling step ``step`` (from 0).

        >>> c = ScheduledConditioning((2, 4), torch.zeros(2, 1, 1))
        >>> [c.entry_at(step) for step in range(4)]
        [0, 0, 0, 1]
        """
        for i, end in enumerate(self.ends):
            if step <= end:
                return i
        return 0


@dataclass(frozen=True)
class PromptSchedule:
    """A request's per-step conditioning: A1111's prompt editing ``[a:b:when]``, alternation ``[a|b]`` and
    ``AND`` (composable diffusion), made once by the TextEncoder.

    Each AND part is its own UNet row, beside the negative prompt's row; the guided noise is
    ``eps_uncond + sum_i weights[i] * guidance_scale * (eps_i - eps_uncond)`` (A1111's
    ``combine_denoised``) when ``composable``, plain classifier-free guidance otherwise.
    """

    parts: tuple[ScheduledConditioning, ...]  # one per AND part (one without AND)
    weights: tuple[float, ...]  # per part
    negative: ScheduledConditioning

    @property
    def composable(self) -> bool:
        return len(self.parts) > 1 or self.weights != (1.0,)


def encode_prompt_schedules(
    encoders: list[PromptEncoder],
    plans: list[PromptPlan],
    adapters: list[list[TextAdapters]] | None = None,
    *,
    zeros_for_empty_negative: bool = False,
) -> list[PromptSchedule]:
    """Encode each plan's distinct texts once and assemble its ``PromptSchedule`` (A1111's padding rules).

    ``encoders``: one (SD 1.x / 2.x) or SDXL's two, whose hidden states are concatenated (the
    pooled embedding is the last encoder's); ``adapters[e][i]``: encoder e's LoRAs for plan i.
    All texts of all plans go through one ``encode_tokenized_pooled`` per encoder (its cache and
    de-duplication make each distinct text one encoding). Token counts, as A1111 makes them stack:

    - the entries of one prompt's schedule are padded with empty chunks to its longest entry
      (``get_learned_conditioning`` encodes them as one batch);
    - shorter AND parts repeat their last token's embedding up to the longest part (``stack_conds``);
    - the parts and the negative prompt are then padded with empty chunks to the longer of the two
      (``pad_cond_uncond``, as ``encode_prompt_pairs`` pads a plain pair).

    ``zeros_for_empty_negative`` (SDXL's ``force_zeros_for_empty_prompt``): an empty negative
    prompt is zeros, embeddings and pooled, as in ``SDXLPromptEncoder``.
    """
    m = len(plans)
    adapters = adapters or [[()] * m for _ in encoders]
    zero = [zeros_for_empty_negative and plan.negative == ((plan.negative[0][0], ""),) for plan in plans]
    # Chunk counts per text: the encoders' tokenizers share CLIP's vocabulary, but take the largest.
    tokenized = [{} for _ in encoders]  # per encoder: text -> TokenizedPrompt
    for encoder, table in zip(encoders, tokenized, strict=True):
        texts = sorted({text for plan in plans for text in _texts(plan)})
        table.update(zip(texts, encoder.tokenize(texts), strict=True))

    def chunks(text: str) -> int:
        return max(len(table[text].chunks) for table in tokenized)

    layouts = []  # per plan: (chunks per part, chunks of the negative, total chunks)
    for plan, z in zip(plans, zero, strict=True):
        part_chunks = [max(chunks(text) for _, text in part) for part in plan.parts]
        negative_chunks = 0 if z else max(chunks(text) for _, text in plan.negative)
        layouts.append((part_chunks, negative_chunks, max(*part_chunks, negative_chunks)))
    # What to encode, per plan: (text, padded chunk count); None is the empty chunk that pads to the total.
    needs: list[list[tuple[str | None, int]]] = []
    for plan, z, (part_chunks, _, total) in zip(plans, zero, layouts, strict=True):
        need = [(text, k) for part, k in zip(plan.parts, part_chunks, strict=True) for _, text in part]
        need += [] if z else [(text, total) for _, text in plan.negative]
        needs.append([*dict.fromkeys([*need, (None, 1)])])
    per_encoder = []  # per encoder: (text, k, adapters) -> (embedding [k*77, hidden], pooled or None)
    for e, (encoder, table) in enumerate(zip(encoders, tokenized, strict=True)):
        keys = {(text, k, adapters[e][i]): None for i, need in enumerate(needs) for text, k in need}
        prompts = [
            TokenizedPrompt((encoder.empty_chunk,), None)
            if text is None
            else table[text].padded(k, encoder.empty_chunk)
            for text, k, _ in keys
        ]
        encoded = encoder.encode_tokenized_pooled(prompts, [a for _, _, a in keys])
        per_encoder.append(dict(zip(keys, encoded, strict=True)))

    out = []
    for i, (plan, (part_chunks, _, total)) in enumerate(zip(plans, layouts, strict=True)):

        def entry(text: str | None, k: int, i=i) -> tuple[torch.Tensor, torch.Tensor | None]:
            found = [table[(text, k, adapters[e][i])] for e, table in enumerate(per_encoder)]
            return torch.cat([z for z, _ in found], dim=-1), found[-1][1]  # [k*77, hidden], [pooled]

        empty, _ = entry(None, 1)  # [77, hidden]
        longest_part = max(part_chunks)
        parts = []
        for part, k in zip(plan.parts, part_chunks, strict=True):
            embeds, pooled = [], []
            for _, text in part:
                z, p = entry(text, k)
                if k < longest_part:  # stack_conds: repeat the last token's embedding
                    z = torch.cat([z, z[-1:].expand((longest_part - k) * empty.shape[0], -1)])
                if longest_part < total:  # pad_cond_uncond: empty chunks
                    z = torch.cat([z, *[empty] * (total - longest_part)])
                embeds.append(z)
                pooled.append(p)
            parts.append(_scheduled(part, embeds, pooled))
        if zero[i]:
            shape = parts[0].embeds.shape[1:]
            negative_embeds = [torch.zeros(shape, dtype=empty.dtype, device=empty.device)]
            negative_pooled = [None if parts[0].pooled is None else torch.zeros_like(parts[0].pooled[0])]
        else:
            found = [entry(text, total) for _, text in plan.negative]
            negative_embeds, negative_pooled = [z for z, _ in found], [p for _, p in found]
        negative = _scheduled(plan.negative, negative_embeds, negative_pooled)
        out.append(PromptSchedule(parts=tuple(parts), weights=plan.weights, negative=negative))
    return out


def _texts(plan: PromptPlan) -> list[str]:
    return [text for part in plan.parts for _, text in part] + [text for _, text in plan.negative]


def _scheduled(schedule: Schedule, embeds: list[torch.Tensor], pooled: list) -> ScheduledConditioning:
    return ScheduledConditioning(
        ends=tuple(end for end, _ in schedule),
        embeds=torch.stack(embeds),  # [entries, tokens, hidden]
        pooled=None if pooled[0] is None else torch.stack(pooled),  # [entries, pooled]
    )
