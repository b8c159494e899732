"""Attention on AMD CPUs: a prompt's causal attention by blocks of queries, and bf16/fp16 attention in fp32.

PyTorch's CPU kernel for causal `scaled_dot_product_attention` runs one small product per head and block; for a
prompt of a few hundred tokens it is slower than the same attention written as batched products over blocks of 64
queries, each against the keys up to its last one, which skip the masked half as the kernel does (opt-125m's heads
at 512 tokens, 2 threads: 3.0 ms against 4.5 on an AMD EPYC with AVX-512). A prompt with a padding mask of ones
(the decoder's mask is then exactly causal) runs so too; one with padding keeps SDPA, faster there. In bf16 and
fp16 the kernel is slower still (one decoding step's attention over 1,536 cached tokens: 790 µs in bf16, 95 µs in
fp32), so there the inputs are cast to fp32, attended in fp32, and the output cast back: no less exact, as the
kernel's own softmax and sums are fp32.

Both are taken only for inference (no dropout, nothing requiring grad) on plain CPU tensors, on AMD CPUs, where
they were measured (the blocks at up to 2 threads); autograd, compile, tracing, autocast, torch modes and every
other case run SDPA itself, as does everything with the environment variable `OPTLITE_CPU_ATTENTION=0` (read at
import).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .cpu_linear import _context_is_plain, _plain_cpu, cpu_vendor


def _switched_on(environ: Mapping[str, str]) -> bool:
    return environ.get("OPTLITE_CPU_ATTENTION", "1").strip().lower() not in ("0", "false", "no", "off")


_ON = cpu_vendor() == "AuthenticAMD" and _switched_on(os.environ)
_HALF = (torch.bfloat16, torch.float16)

_BLOCK = 64  # queries per block
# The most fp32 scores one block may hold (B * H * 64 queries * T keys * 4 bytes). Beyond it the blocks' scores no
# longer stay in the caches between their products and their softmax, and SDPA's kernel is the faster.
_MAX_SCORES = 4 << 20
# Measured at 1 and 2 threads. With more, SDPA's kernel spreads (batch, head, block) items over the cores, where
# batched products over a dozen heads may use them less well: unmeasured, so SDPA runs.
_MAX_THREADS = 2


def _inference_on_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Plain (B, H, T, D) CPU tensors of one float dtype that nothing differentiates, outside any compile, trace,
    autocast or torch mode, on an AMD CPU with the switch on."""
    if not _ON or q.dim() != 4 or q.dtype not in (torch.float32, *_HALF):
        return False
    if not all(_plain_cpu(t, q.dtype) for t in (q, k, v)) or not (mask is None or _plain_cpu(mask, mask.dtype)):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mask)):
        return False
    return _context_is_plain()


def _blockwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether causal fp32 attention without a past runs by blocks (more than one block, scores within bounds)."""
    B, H, T, _ = q.shape
    return (q.dtype == torch.float32 and _BLOCK < T == k.shape[-2] and B * H * _BLOCK * T * 4 <= _MAX_SCORES
            and torch.get_num_threads() <= _MAX_THREADS)


def _only_causal(mask: torch.Tensor, T: int) -> bool:
    """Whether a boolean (B, 1, T, T) mask lets each query see exactly itself and the keys before it: the decoder's
    mask for a padding mask of ones."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (T, T):
        return False
    return torch.equal(mask, torch.ones(T, T, dtype=torch.bool).tril_().expand_as(mask))


def _causal_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
    scale=1.0)` for (B, H, T, D) queries and (B, H, S, D) keys and values.

    Example:
        >>> q, k, v = torch.randn(3, 1, 2, 100, 8).unbind(0)
        >>> ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        >>> torch.allclose(attention(q, k, v, is_causal=True), ref, atol=1e-6)
        True
    """
    if not dropout_p and _inference_on_cpu(q, k, v, mask):
        if q.dtype in _HALF:
            mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
            return attention(q.float(), k.float(), v.float(), mask, is_causal).to(q.dtype)
        # causal without a mask, or with one that is only causal (a padding mask of ones); SDPA masks any other
        T = q.shape[-2]
        if _blockwise(q, k, v) and (mask is None if is_causal else mask is not None and _only_causal(mask, T)):
            return _causal_blocks(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=1.0)
