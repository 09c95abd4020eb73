"""LyCORIS algorithms -> the canonical LoRA form, exactly, at registration.

LyCORIS (and kohya-ss sd-scripts' LoCon) files name modules the kohya way (``lora_unet_<path>.<tensor>``) and
hold one of these per module; each update ``ΔW`` is rewritten as ``scale' · B' @ A'`` with no approximation, so
the serving side only ever sees LoRA (``canonical``):

- **LoRA / LoCon** (``lora_down``, ``lora_up``, ``alpha``): already canonical; LoCon just adapts convolutions.
- **Tucker LoCon** (``lora_mid`` too): ``down [r, in, 1, 1]``, ``mid [r, r, kh, kw]``, ``up [out, r, 1, 1]``;
  the forward ``up(mid(down(x)))`` is one k x k convolution, so ``A' = mid ∘ down`` (``[r, in, kh, kw]``),
  ``B' = up``: same rank, same memory as a plain conv LoRA. Scale ``alpha / r``.
- **LoHa** (``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, optional Tucker cores ``hada_t1``,
  ``hada_t2``): ``ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha / r`` (``r = w1b.shape[0]``; conv weights flattened to
  ``[out, in·kh·kw]``). By the Khatri-Rao identity ``(U1 V1) ⊙ (U2 V2) = (U1 ∗ U2)(V1 ∗ V2)``, it is a LoRA of
  rank ``r1 · r2``: ``B'[o, (a, b)] = w1a[o, a] · w2a[o, b]``, ``A'[(a, b), i] = w1b[a, i] · w2b[b, i]``.
- **LoKr** (``lokr_w1`` or ``lokr_w1_a`` / ``_b``; ``lokr_w2`` or ``lokr_w2_a`` / ``_b``, optional Tucker core
  ``lokr_t2``): ``ΔW = kron(w1, w2) · scale``. With ``w1 = U1 V1`` and ``w2 = U2 V2``,
  ``kron(U1 V1, U2 V2) = kron(U1, U2) · kron(V1, V2)``: a LoRA of rank ``rank1 · rank2``, where a factorised
  ``w`` has its own rank and a full one ``[p, q]`` is ``w · I(q)`` or ``I(p) · w``, rank ``min(p, q)``.
  Scale: ``alpha / r`` with ``r`` the rank of the factorised one (``w1``'s if both are); ``1`` when both are
  full (LyCORIS ignores alpha then; peft, which always uses ``alpha / r``, is exported with it folded in).

The scale and Tucker conventions are LyCORIS's (``lycoris/modules/{locon,loha,lokr}.py``,
``functional.general.rebuild_tucker``: ``einsum("i j k l, i p, j r -> p r k l", t, wa, wb)``), which are also
peft's (``tuners/loha/layer.py``, ``tuners/lokr/layer.py``) and ComfyUI's. A missing or zero ``alpha`` means
``alpha = r`` (scale 1), as LyCORIS loads it.

The canonical rank of LoHa and LoKr is a product and may exceed the registry's ``max_rank``: such files are
refused at registration (``rank_too_high``, naming the factors), never served approximately. Every converted
module is stored in float32, whatever the source dtype, so the conversion rounds once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .base_model import ModuleShape

LORA, TUCKER, LOHA, LOKR = "lora", "tucker", "loha", "lokr"
ALGORITHM_NAMES = {LORA: "LoRA", TUCKER: "Tucker LoCon", LOHA: "LoHa", LOKR: "LoKr"}
MID = "lora_mid.weight"
LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
ROLES = (MID, *LOHA_ROLES, *LOKR_ROLES)  # tensors a module may have besides lora_down / lora_up / alpha


def algorithm(roles: set[str]) -> str:
    """The algorithm a module's tensors belong to (their roles, besides A / B / alpha); ``ValueError`` if they
    mix algorithms."""
    kinds = {LOHA if r in LOHA_ROLES else LOKR if r in LOKR_ROLES else TUCKER for r in roles if r in ROLES}
    if len(kinds) > 1:
        raise ValueError(f"mixes {' and '.join(sorted(ALGORITHM_NAMES[k] for k in kinds))} tensors")
    return kinds.pop() if kinds else LORA


def missing(kind: str, roles: set[str], has_a: bool, has_b: bool) -> str | None:
    """What a module of ``kind`` lacks or has in excess, in words; ``None`` when its tensors are complete."""
    if kind in (LORA, TUCKER):
        return None if has_a and has_b else "a down (A) and an up (B) weight"
    if has_a or has_b:
        return f"no lora_down / lora_up next to {ALGORITHM_NAMES[kind]} tensors"
    if kind == LOHA:
        need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
        if not need <= roles:
            return "hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b"
        if ("hada_t1" in roles) != ("hada_t2" in roles):
            return "both Tucker cores hada_t1 and hada_t2, or neither"
        return None
    for side in ("1", "2"):
        full, a, b = f"lokr_w{side}" in roles, f"lokr_w{side}_a" in roles, f"lokr_w{side}_b" in roles
        if full == (a and b) or a != b:
            return f"either lokr_w{side} or both lokr_w{side}_a and lokr_w{side}_b"
    if "lokr_t2" in roles and "lokr_w2" in roles:
        return "lokr_t2 only with lokr_w2_a / lokr_w2_b"
    return None


@dataclass(frozen=True)
class SourceRank:
    """The canonical rank a module converts to, the rank its scale divides by, and how (for messages)."""

    rank: int
    scale_rank: int | None  # None: scale 1 whatever alpha (LoKr with both factors full)
    detail: str = ""  # e.g. "LoHa 8 x 8"


class ShapeError(ValueError):
    """A tensor whose shape does not fit the module: ``key`` got ``got``, expected ``expected`` (words)."""

    def __init__(self, role: str, got: tuple[int, ...], expected: str):
        self.role, self.got, self.expected = role, got, expected
        super().__init__(f"{role}: {list(got)} != expected {expected}")


def _expect(role: str, got: tuple[int, ...], *allowed: tuple[int, ...]) -> None:
    if tuple(got) not in allowed:
        raise ShapeError(role, got, " or ".join(str(list(a)) for a in allowed))


def _kernel(module: ModuleShape) -> tuple[int, ...]:
    return tuple(module.kernel_size) if module.kind == "conv2d" else ()


def source_rank(kind: str, shapes: Mapping[str, tuple[int, ...]], module: ModuleShape) -> SourceRank:
    """Check a LyCORIS module's tensor shapes (``role -> shape``; ``"A"`` / ``"B"`` for ``lora_down`` /
    ``lora_up``) against ``module``; ``ShapeError`` for the first that does not fit."""
    out, inp, kernel = module.out_features, module.in_features, _kernel(module)
    k = math.prod(kernel)
    if kind == TUCKER:
        if module.kind != "conv2d":
            raise ShapeError(MID, shapes[MID], "no lora_mid: Tucker LoCon applies to convolutions only")
        r = shapes["A"][0] if shapes["A"] else 0
        _expect("A", shapes["A"], (r, inp, 1, 1), (r, inp))
        _expect(MID, shapes[MID], (r, r, *kernel))
        _expect("B", shapes["B"], (out, r, 1, 1), (out, r))
        return SourceRank(r, r, f"Tucker LoCon r={r}")
    if kind == LOHA:
        ranks = []
        for side in ("1", "2"):
            a, b = shapes[f"hada_w{side}_a"], shapes[f"hada_w{side}_b"]
            if f"hada_t{side}" in shapes:  # Tucker: t [r, r, kh, kw], a [r, out], b [r, in]
                if module.kind != "conv2d":
                    raise ShapeError(f"hada_t{side}", shapes[f"hada_t{side}"], "none: Tucker cores are for convs")
                r = a[0] if a else 0
                _expect(f"hada_w{side}_a", a, (r, out))
                _expect(f"hada_w{side}_b", b, (r, inp))
                _expect(f"hada_t{side}", shapes[f"hada_t{side}"], (r, r, *kernel))
            else:  # a [out, r], b [r, in * kh * kw]
                r = a[1] if len(a) == 2 else 0
                _expect(f"hada_w{side}_a", a, (out, r))
                _expect(f"hada_w{side}_b", b, (r, inp * k), (r, inp, *kernel))
            if r < 1:
                raise ShapeError(f"hada_w{side}_a", a, "a rank >= 1")
            ranks.append(r)
        return SourceRank(ranks[0] * ranks[1], ranks[0], f"LoHa {ranks[0]} x {ranks[1]}")
    if kind == LOKR:
        return _lokr_rank(shapes, module)
    raise ValueError(f"unknown algorithm {kind!r}")


def _lokr_rank(shapes: Mapping[str, tuple[int, ...]], module: ModuleShape) -> SourceRank:
    out, inp, kernel = module.out_features, module.in_features, _kernel(module)
    k = math.prod(kernel)
    if "lokr_w1" in shapes:
        w1 = shapes["lokr_w1"]
        if len(w1) != 2 or min(w1) < 1 or out % w1[0] or inp % w1[1]:
            raise ShapeError("lokr_w1", w1, f"[a, c] with a dividing {out} and c dividing {inp}")
        a, c = w1
        r1, rank1 = None, min(a, c)
    else:
        w1a, w1b = shapes["lokr_w1_a"], shapes["lokr_w1_b"]
        if len(w1a) != 2 or len(w1b) != 2 or w1a[1] != w1b[0] or min(*w1a, *w1b) < 1:
            raise ShapeError("lokr_w1_b", w1b, f"[r, c] after lokr_w1_a {list(w1a)} = [a, r]")
        (a, r1), c = w1a, w1b[1]
        if out % a or inp % c:
            raise ShapeError("lokr_w1_a", w1a, f"[a, r] and [r, c] with a dividing {out} and c dividing {inp}")
        rank1 = r1
    b, d = out // a, inp // c
    if "lokr_w2" in shapes:
        _expect("lokr_w2", shapes["lokr_w2"], (b, d, *kernel))
        r2, rank2 = None, min(b, d * k)
    elif "lokr_t2" in shapes:  # Tucker: t [r, r, kh, kw], a [r, b], b [r, d]
        if module.kind != "conv2d":
            raise ShapeError("lokr_t2", shapes["lokr_t2"], "none: Tucker cores are for convs")
        r2 = shapes["lokr_w2_a"][0] if shapes["lokr_w2_a"] else 0
        _expect("lokr_w2_a", shapes["lokr_w2_a"], (r2, b))
        _expect("lokr_w2_b", shapes["lokr_w2_b"], (r2, d))
        _expect("lokr_t2", shapes["lokr_t2"], (r2, r2, *kernel))
        rank2 = r2
    else:  # a [b, r], b [r, d * kh * kw]
        w2a = shapes["lokr_w2_a"]
        r2 = w2a[1] if len(w2a) == 2 else 0
        _expect("lokr_w2_a", w2a, (b, r2))
        _expect("lokr_w2_b", shapes["lokr_w2_b"], (r2, d * k), (r2, d, *kernel))
        rank2 = r2
    if rank1 < 1 or rank2 < 1:
        raise ShapeError("lokr_w2_a", shapes.get("lokr_w2_a", ()), "a rank >= 1")
    if r1 is not None and r2 is not None and r1 != r2:
        # LyCORIS divides by w1's rank, ComfyUI by w2's: with two different ranks the scale is ambiguous.
        raise ShapeError("lokr_w2_b", shapes["lokr_w2_b"], f"the rank of lokr_w1_b ({r1}): the scale is alpha / r")
    scale_rank = r1 if r1 is not None else r2
    return SourceRank(rank1 * rank2, scale_rank, f"LoKr {rank1} x {rank2}")


def source_scale(source: SourceRank, alpha: float | None) -> float:
    """The module's ``ΔW`` multiplier: ``alpha / r`` (alpha missing or 0: ``1``), or ``1`` for full LoKr."""
    if source.scale_rank is None or alpha is None or alpha == 0:
        return 1.0
    return alpha / source.scale_rank


def _factor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full matrix ``[p, q]`` as ``U @ V`` of the smaller rank: ``(w, I(q))`` or ``(I(p), w)``."""
    p, q = w.shape
    if q <= p:
        return w, torch.eye(q, dtype=w.dtype)
    return torch.eye(p, dtype=w.dtype), w


def _tucker_v(t: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``V[i, (r, k, l)] = Σ_j t[i, j, k, l] · wb[j, r]``: a Tucker core folded into its in-side factor, so
    that ``rebuild_tucker(t, wa, wb) = (wa.T @ V)`` reshaped."""
    return torch.einsum("ijkl,jr->irkl", t, wb).flatten(1)


def to_lora(
    kind: str, tensors: Mapping[str, torch.Tensor], module: ModuleShape, source: SourceRank
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [R, in(, kh, kw)], B [out, R(, 1, 1)])`` with ``B @ A = ΔW / scale``, in float64 (``R`` =
    ``source.rank``). ``tensors`` maps roles (``"A"``, ``"B"``, ``"lora_mid.weight"``, ``"hada_w1_a"``...) to
    the module's tensors."""
    t = {role: x.double() for role, x in tensors.items()}
    out, inp = module.out_features, module.in_features
    if kind == TUCKER:
        r = t["A"].shape[0]
        A = torch.einsum("abkl,bi->aikl", t[MID], t["A"].reshape(r, inp))  # [r, in, kh, kw]
        B = t["B"].reshape(out, r)
    elif kind == LOHA:
        us, vs = [], []
        for side in ("1", "2"):
            if f"hada_t{side}" in t:
                us.append(t[f"hada_w{side}_a"].T)  # [out, r]
                vs.append(_tucker_v(t[f"hada_t{side}"], t[f"hada_w{side}_b"]))  # [r, in * kh * kw]
            else:
                us.append(t[f"hada_w{side}_a"])
                vs.append(t[f"hada_w{side}_b"].flatten(1))
        (u1, u2), (v1, v2) = us, vs
        B = (u1[:, :, None] * u2[:, None, :]).reshape(out, -1)  # [out, r1 * r2]: Khatri-Rao of the columns
        A = (v1[:, None, :] * v2[None, :, :]).reshape(-1, v1.shape[1])  # [r1 * r2, in * kh * kw]
    elif kind == LOKR:
        u1, v1 = _factor(t["lokr_w1"]) if "lokr_w1" in t else (t["lokr_w1_a"], t["lokr_w1_b"])
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
            u2, v2 = _factor(w2.reshape(w2.shape[0], -1))  # [b, d * kh * kw]
        elif "lokr_t2" in t:
            u2, v2 = t["lokr_w2_a"].T, _tucker_v(t["lokr_t2"], t["lokr_w2_b"])
        else:
            u2, v2 = t["lokr_w2_a"], t["lokr_w2_b"].flatten(1)
        B = torch.kron(u1.contiguous(), u2.contiguous())  # [a * b, rank1 * rank2]
        A = torch.kron(v1.contiguous(), v2.contiguous())  # [rank1 * rank2, c * d * kh * kw]
    else:
        raise ValueError(f"no conversion for {kind!r}")
    if A.shape[0] != source.rank:
        raise AssertionError(f"{kind} conversion gave rank {A.shape[0]}, expected {source.rank}")
    A = A.reshape(module.lora_a_shape(source.rank))
    B = B.reshape(module.lora_b_shape(source.rank))
    return A, B
