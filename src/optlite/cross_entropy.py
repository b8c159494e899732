"""The language-modelling loss on the CPU: cross entropy over a vocabulary-wide row, computed block by block.

`F.cross_entropy` keeps an (N, V) log-softmax for the backward pass and, in it, fills an (N, V) tensor of zeros
for the loss's gradient, then reads both again to make the logits' gradient. At OPT's vocabulary those are the
largest tensors of a training step (4x256 tokens: 206 MB each), each a pass over memory and, freshly allocated, a
page fault per 4 KB. `cross_entropy` keeps two numbers per row instead (the row's maximum and the log of its sum
of exponentials) and writes the gradient in one pass, a few rows at a time so that each block's intermediates
stay in cache. Same value and gradient as `F.cross_entropy(logits, targets, ignore_index=-100)` (mean over the
targets not ignored; NaN when all are), to fp32 rounding. On other devices, under compile (inductor fuses the
loss itself, and the blocks would tie a graph to N) and under torch.func transforms it is `F.cross_entropy`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the target value the loss skips (torch's cross_entropy default)
_BLOCK_ELEMENTS = 1 << 20  # a block of rows: 4 MB of fp32 logits, the size of a core's L2 cache or two


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of (N, V) logits against (N,) class ids; IGNORE_INDEX rows are left out.

    Example:
        >>> import torch
        >>> logits = torch.zeros(2, 4)
        >>> round(cross_entropy(logits, torch.tensor([1, -100])).item(), 4)  # log(4)
        1.3863
    """
    # The blocks write in place, which vmap cannot; on a GPU each block would be kernel launches, not cache reuse.
    if (not logits.is_cpu or torch.compiler.is_compiling()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    return _CrossEntropy.apply(logits, targets)[0]


def _blocks(n_rows: int, width: int) -> list[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(width, 1))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


class _CrossEntropy(torch.autograd.Function):
    # log p = (x - max) - log(sum(exp(x - max))), in that order, as torch's log_softmax: x - logsumexp(x) would
    # round at the scale of the log-sum-exp rather than of the difference.
    @staticmethod
    def forward(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        keep = targets != IGNORE_INDEX  # (N,)
        safe = targets.masked_fill(~keep, 0)  # (N,) an ignored row reads column 0, then weighs 0
        blocks = _blocks(*logits.shape)
        top = logits.amax(dim=-1, keepdim=True)  # (N, 1)
        log_sum = torch.empty_like(top)  # (N, 1)
        scratch = logits.new_empty(blocks[0].stop - blocks[0].start, logits.shape[1]) if blocks else None
        for rows in blocks:  # one scratch block for exp(x - max): no fresh memory per block
            block = scratch[: rows.stop - rows.start]
            torch.sub(logits[rows], top[rows], out=block)
            torch.sum(block.exp_(), dim=-1, keepdim=True, out=log_sum[rows])
        log_sum.log_()
        log_p = (logits.gather(1, safe[:, None]) - top) - log_sum  # (N, 1) at the targets
        count = keep.sum()
        loss = torch.where(keep, -log_p.squeeze(1), 0).sum() / count  # 0/0 = NaN with every row ignored, as torch
        return loss, safe, top, log_sum, keep, count

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, outputs: tuple) -> None:
        ctx.save_for_backward(inputs[0], *outputs[1:])
        ctx.mark_non_differentiable(*outputs[1:])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *unused: Any) -> tuple[torch.Tensor, None]:
        logits, safe, top, log_sum, keep, count = ctx.saved_tensors
        weight = torch.where(keep, grad / count, 0).to(logits.dtype)[:, None]  # (N, 1) d loss / d(-log p[target])
        if torch.is_grad_enabled():  # create_graph=True (Hessian-vector products): a differentiable gradient
            return (F.softmax(logits, dim=-1) * weight).scatter_add(1, safe[:, None], -weight), None
        out = torch.empty_like(logits)  # (N, V)
        for rows in _blocks(*logits.shape):  # softmax(logits) * weight, one block in cache at a time
            block = out[rows]
            torch.sub(logits[rows], top[rows], out=block)
            block.sub_(log_sum[rows]).exp_().mul_(weight[rows])
        return out.scatter_add_(1, safe[:, None], -weight), None
