"""Batch-invariant kernels on the CPU: a row's result must not depend on its batch-mates.

Batching must not change images. On the CPU several kernels break that:

- convolutions (oneDNN's and PyTorch's own) split their reductions across
  threads differently for one image than for several;
- GEMMs with very few rows (M < 12 here) or a non-contiguous operand take
  other BLAS code paths; the time-embedding projections have one row per image;
- SDPA splits short queries across threads by batch size;
- GroupNorm takes another kernel for non-contiguous inputs.

Last-bit differences would not matter for a trained model, but a denoising
loop with classifier-free guidance amplifies them step after step (about 20x
per step on random weights), so a request's image would depend on what else
was running. With these two fixes a row's arithmetic is the same whatever
batch it is in, and batched images are bit-identical to unbatched ones.

The VAE has no such loop, but its float output is rounded to 8-bit pixels:
``images.decode`` runs it image by image in deterministic mode so that the
bytes of an image never depend on its batch-mates either.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# BLAS takes the same per-row path for every M >= 12 (checked by tests/test_batch_invariance.py).
MIN_GEMM_ROWS = 16


def row_invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` whose result for a row does not depend on how many rows come with it."""
    # A non-contiguous operand takes another BLAS path (transposed GEMM), and
    # whether a view is contiguous can depend on the batch size.
    x = x.contiguous()
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows >= MIN_GEMM_ROWS or rows == 0:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    padded = torch.cat([flat, flat.new_zeros(MIN_GEMM_ROWS - rows, flat.shape[-1])])
    return F.linear(padded, weight, bias)[:rows].reshape(*x.shape[:-1], -1)


def _row_padded_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return row_invariant_linear(x, self.weight, self.bias)


def row_invariant_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """``F.conv2d`` as im2col plus one GEMM with a row per output pixel.

    Rows never share a reduction, whatever the batch (CPU convolutions split
    their reductions across threads differently for one image than for several).
    """
    n, _, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        cols = x.permute(0, 2, 3, 1).reshape(n * h * w, -1)  # [n*h*w, c]
    else:
        cols = F.unfold(x, (kh, kw), dilation, padding, stride)  # [n, c*kh*kw, h_out*w_out]
        cols = cols.transpose(1, 2).reshape(n * h_out * w_out, -1)  # [n*h_out*w_out, c*kh*kw]
    out = row_invariant_linear(cols, weight.reshape(out_channels, -1), bias)
    return out.reshape(n, h_out, w_out, out_channels).permute(0, 3, 1, 2).contiguous()


def _conv2d_as_gemm(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return row_invariant_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


def _contiguous_group_norm(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    # A non-contiguous input (attention output reshaped back to an image) takes
    # another kernel, and whether it is contiguous can depend on the batch size.
    return F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)


def _contiguous_geglu(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # GELU on a strided half of the projection vectorises differently by batch size.
    h, gate = self.proj(x).chunk(2, dim=-1)
    return h.contiguous() * self.gelu(gate.contiguous())


def _gemm_convertible(module: torch.nn.Module) -> bool:
    return (
        type(module) is torch.nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and isinstance(module.padding, tuple)
    )


def make_batch_invariant(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model``'s per-row arithmetic independent of its batch (in place).

    Every ``nn.Linear`` pads tiny GEMMs to ``MIN_GEMM_ROWS`` rows, every
    ``nn.Conv2d`` runs as im2col plus such a GEMM, every ``nn.GroupNorm``
    normalises a contiguous copy, and diffusers
    models use the plain ``bmm`` attention: CPU SDPA splits short queries
    (fewer than about 5 tokens, e.g. SD's mid block at 64 px) across threads by
    batch size.
    """
    if hasattr(model, "set_attn_processor"):
        from diffusers.models.attention_processor import AttnProcessor

        model.set_attn_processor(AttnProcessor())
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = types.MethodType(_row_padded_linear, module)
        elif _gemm_convertible(module):
            module.forward = types.MethodType(_conv2d_as_gemm, module)
        elif type(module) is torch.nn.GroupNorm:
            module.forward = types.MethodType(_contiguous_group_norm, module)
        elif type(module).__name__ == "GEGLU" and hasattr(module, "proj"):
            module.forward = types.MethodType(_contiguous_geglu, module)
    return model
