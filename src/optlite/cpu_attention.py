"""Causal attention over a prompt on the CPU, by blocks of queries.

PyTorch's CPU kernel for `scaled_dot_product_attention(..., is_causal=True)` runs one small product per head and
block; for a prompt of a few hundred tokens it is slower than the same attention written as batched products over
blocks of 64 queries, each against the keys up to its last one, which skip the masked half as the kernel does
(opt-125m's heads at 512 tokens, 2 threads: 3.0 ms against 4.5 on an AMD EPYC with AVX-512). Taken only for fp32
inference on plain CPU tensors, on AMD CPUs, where it was measured; autograd, compile, tracing and every other
case run SDPA itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_linear import _context_is_plain, _plain_fp32_cpu, cpu_vendor

_ON = cpu_vendor() == "AuthenticAMD"

_BLOCK = 64  # queries per block
# The most fp32 scores one block may hold (B * H * 64 queries * T keys * 4 bytes). Beyond it the blocks' scores no
# longer stay in the caches between their products and their softmax, and SDPA's kernel is the faster.
_MAX_SCORES = 4 << 20


def _blockwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if not _ON or q.dim() != 4:
        return False
    B, H, T, _ = q.shape
    if T <= _BLOCK or k.shape[-2] != T or B * H * _BLOCK * T * 4 > _MAX_SCORES:
        return False
    if not all(_plain_fp32_cpu(t) for t in (q, k, v)):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return _context_is_plain()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)` for (B, H, T, D) queries, keys and
    values of the same T tokens (no past).

    Example:
        >>> q, k, v = torch.randn(3, 1, 2, 100, 8).unbind(0)
        >>> ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        >>> torch.allclose(causal_attention(q, k, v), ref, atol=1e-6)
        True
    """
    if not _blockwise(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    T = q.shape[-2]
    k_t = k.transpose(-1, -2)  # (B, H, D, T)
    above = torch.ones(_BLOCK, _BLOCK, dtype=torch.bool).triu_(1)  # a block's keys after each of its queries
    blocks = []
    for start in range(0, T, _BLOCK):
        stop = min(start + _BLOCK, T)
        scores = q[..., start:stop, :] @ k_t[..., :stop]  # (B, H, t, stop)
        scores[..., start:].masked_fill_(above[:stop - start, :stop - start], float("-inf"))
        blocks.append(torch.softmax(scores, dim=-1) @ v[..., :stop, :])  # (B, H, t, D)
    return torch.cat(blocks, dim=-2)  # (B, H, T, D)
