"""fp32 projections on the CPU through oneDNN instead of the default BLAS.

`F.linear` on the CPU runs MKL's sgemm, which is slow on AMD CPUs and for the few rows of batched decoding.
oneDNN's fp32 kernel (`torch.ops.mkldnn._linear_pointwise`) computes the same product from the same, plain weight
(no copy, no packing) 1.3-3x faster on every row count of OPT's decoding and prefill on AMD CPUs with AVX-512. On
an Intel CPU, where MKL runs its own best kernels, only inference products of four rows or more take it (see
`mkl_first`); on CPUs without AVX-512 training stays MKL's (`mkl_trains`), and on those that are not Intel's so do
inference products of more than 64 rows (`_MKL_MANY`). The model calls `project(module, x)` where it would call
`module(x)`; the oneDNN kernel is taken only when that is provably the same computation as `module(x)`, else
`module(x)` runs exactly as before, so hooks, PEFT adapters, accelerate's offloading, tensor subclasses (torchao),
autocast, compile, tracing and autograd see a plain `nn.Linear` call. On the kernel, fc1's ReLU and (outside
training) fc2's residual add run inside the product as oneDNN post-ops: decoding's small element-wise ops each cost
a pass through caches the streamed weights keep evicting.

On those CPUs (AMD without AVX-512) inference products of 4 to 24 rows (batched decoding, beams) are computed as
`(weight @ x.T).T` (`_swapped_product`).

Each attention layer keeps its q/k/v weights (and biases) as views of one buffer (`share_storage`): the same three
Parameters, state_dict and files, but `project_stacked` reads them as one matrix, one product instead of three
(decoding's matrix-vector products stream a larger matrix better and pay oneDNN's per-call cost once). A weight
given storage of its own later (`.data = ...`, `.to()`, `load_state_dict(assign=True)`, a deepcopy) runs as its
own product again, as does any module with hooks, and training always runs them apart.

Turn it off with the environment variable `OPTLITE_ONEDNN_LINEAR=0` (read at import) or `use_onednn(False)`.

Opt-in, `OPTLITE_ONEDNN_LINEAR=packed` or `use_onednn(packed=True)`: inference projections run on a copy of each
weight reordered into oneDNN's blocked layout, made on first use; faster for decoding (few rows; on an Intel CPU
from four rows, as one to three stay MKL's), at the cost of a second copy of every weight in memory (opt-125m: peak
RSS 1.26 GiB against 0.90 GiB). bf16 models take it too, for inference, on CPUs where oneDNN runs bf16 (AVX-512):
a plain bf16 weight gains nothing from oneDNN, which reorders it on every call, but a packed one streams 2-2.7x
faster in one-row products. A copy is remade when its weight changes: its `_version` (in-place writes), its
storage (`weight.data = ...`), or a step of any torch optimizer holding it (the fused AdamW kernel leaves `_version`
as it was). Writes through `weight.data` (`weight.data.mul_(2)`) are not tracked by `_version` either: call
`use_onednn(packed=True)` again after those to drop every copy.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
import torch.nn.modules.module as module_hooks
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

_SETTING = os.environ.get("OPTLITE_ONEDNN_LINEAR", "1").strip().lower()
_ENABLED = _SETTING not in ("0", "false", "no", "off")
_PACKED = _SETTING == "packed"
_PACK_ROWS = 8  # the row count oneDNN tunes the blocked layout for: decoding's few rows


def _find_kernels() -> tuple[Callable[..., torch.Tensor] | None, Callable[..., torch.Tensor] | None]:
    """oneDNN's linear, `_linear_pointwise(x, weight, bias, "none", [], "")`, and its variant that adds a tensor to
    the output, `_linear_pointwise.binary(x, other, weight, bias, "add")`; (None, None) in a build without them."""
    if not torch.backends.mkldnn.is_available():
        return None, None
    try:
        return torch.ops.mkldnn._linear_pointwise.default, torch.ops.mkldnn._linear_pointwise.binary
    except (AttributeError, RuntimeError):
        return None, None


_KERNEL, _KERNEL_ADD = _find_kernels()


def cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD"), from /proc/cpuinfo or, elsewhere (Windows),
    `platform.processor()`; "" when neither names one (macOS, ARM)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in platform.processor()), "")


def mkl_first(vendor: str, mkl: bool) -> bool:
    """Whether F.linear's MKL products stay in charge of one to three rows and of training: on an Intel CPU with
    MKL. Measured over opt-125m's weights on a Xeon with AVX-512 and AMX: MKL's matrix-vector kernels stream the
    weights at the memory's read bandwidth, 1.3x oneDNN's on one row and 1.4x on two or three (on four, 0.95x;
    on eight, 0.8x), and a 4x256 training step took 1.1x as long with oneDNN's forward and input gradient (fc2's
    input gradient alone twice MKL's). On AMD CPUs MKL does not run those kernels, and oneDNN is faster throughout.

    Example:
        >>> mkl_first("GenuineIntel", mkl=True), mkl_first("AuthenticAMD", mkl=True)
        (True, False)
    """
    return mkl and vendor == "GenuineIntel"


def mkl_trains(vendor: str, mkl: bool, avx512: bool) -> bool:
    """Whether training's products stay F.linear's (MKL): where `mkl_first`, and on CPUs without AVX-512. On an
    AVX2-only AMD EPYC (family 25 model 1) MKL's and oneDNN's products of a 4x256 step ran at the same 114-176
    GFLOP/s, and the step took 4% longer with oneDNN's forward and input gradient (two in-process A/B runs); on an
    AVX-512 AMD EPYC oneDNN's made the step faster.

    Example:
        >>> mkl_trains("AuthenticAMD", mkl=True, avx512=False), mkl_trains("AuthenticAMD", mkl=True, avx512=True)
        (True, False)
    """
    return mkl_first(vendor, mkl) or (mkl and not avx512)


_VENDOR, _MKL = cpu_vendor(), torch.backends.mkl.is_available()
_MKL_FIRST = mkl_first(_VENDOR, _MKL)
_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
_MKL_TRAINS = mkl_trains(_VENDOR, _MKL, _AVX512)
# Where inference products of 4 to 24 rows run as (weight @ x.T).T (`_swapped_product`): measured on an AVX2-only
# AMD EPYC; not tried on AVX-512 CPUs, nor on Intel ones, where MKL or oneDNN keep them as before.
_SWAP = not _MKL_FIRST and not _AVX512
_SWAP_ROWS = (4, 24)
# Where products of more than 64 rows stay F.linear's (MKL): the same CPUs, where MKL's sgemm ran the decoder's
# products of 128 to 2048 rows 1.03-1.3x faster than oneDNN's (a quiet hour; at 32 and 64 rows oneDNN's was ahead).
_MKL_MANY = _MKL and not _MKL_FIRST and not _AVX512
_MKL_MANY_ROWS = 64
_MKL_ROWS = 3  # the row count up to which MKL keeps a product when _MKL_FIRST
_AVAILABLE = _KERNEL is not None


def _onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 products on this CPU (AVX-512 or newer), so a packed bf16 weight can take it."""
    try:
        return _AVAILABLE and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_BF16 = _onednn_bf16()
_PLAIN = (torch.Tensor, nn.Parameter)  # exactly these types: a subclass (torchao, fake tensors) has its own linear
_GLOBAL_HOOKS = (module_hooks._global_forward_hooks, module_hooks._global_forward_pre_hooks,
                 module_hooks._global_backward_hooks, module_hooks._global_backward_pre_hooks)


def use_onednn(enabled: bool = True, packed: bool = False) -> None:
    """Turn the oneDNN projections on or off for the whole process (on by default where the kernel exists);
    `packed=True` also runs inference on reordered copies of the weights (faster decoding, twice the memory).

    Example:
        >>> from optlite.cpu_linear import onednn_enabled, use_onednn
        >>> use_onednn(False); onednn_enabled()
        False
        >>> use_onednn(True)
    """
    global _ENABLED, _PACKED, _STEP_HOOK
    _ENABLED, _PACKED = bool(enabled), bool(enabled and packed)
    _PACKS.clear()
    if _PACKED and _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_post_hook(_drop_packs_of_optimizer)
    elif not _PACKED and _STEP_HOOK is not None:
        _STEP_HOOK.remove()
        _STEP_HOOK = None


def onednn_enabled() -> bool:
    """Whether `project` may take the oneDNN kernel: switched on, and present in this build of torch."""
    return _ENABLED and _AVAILABLE


# weight -> (a view holding its storage, its _version when packed, the packed copy). The view keeps the old storage
# alive, so a new storage can never reuse its address and pass for it.
_PACKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The blocked-layout copy of `weight` for oneDNN, made again whenever `weight` changed since the last one."""
    entry = _PACKS.get(weight)
    if entry is not None:
        source, version, packed = entry
        if source.data_ptr() == weight.data_ptr() and version == weight._version and source.shape == weight.shape:
            return packed
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS)
    _PACKS[weight] = (weight.detach(), weight._version, packed)
    return packed


def _drop_packs_of_optimizer(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """After an optimizer step: its parameters changed, and a fused kernel may not have bumped their _version."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            _PACKS.pop(p, None)


_STEP_HOOK: Any = None
if _PACKED:
    _STEP_HOOK = register_optimizer_step_post_hook(_drop_packs_of_optimizer)


def _plain_cpu(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    return type(t) in _PLAIN and t.dtype is dtype and t.is_cpu and t.layout is torch.strided


def _unhooked(module: nn.Module) -> bool:
    """No hook of its own and no per-instance forward (accelerate, patching): `module(x)` runs its class's
    forward and nothing else (global hooks aside)."""
    return not ("forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks)


def _plain_parameters(module: nn.Module) -> tuple[Any, Any] | None:
    """(weight, bias) of an nn.Linear (not a subclass) that is `_unhooked`; None for any other module. Read from
    `_parameters`: `module.weight` goes through nn.Module.__getattr__, a measurable cost at decoding's ~50
    projections a token."""
    if type(module) is not nn.Linear or not _unhooked(module):
        return None
    params = module._parameters
    if "weight" not in params or "bias" not in params:  # one replaced by a plain attribute: module(x) reads that
        return None
    return params["weight"], params["bias"]


def _context_is_plain() -> bool:
    """No global module hook, autocast, compile/trace/export, functorch transform, forward-mode AD level or torch
    mode is active."""
    return not (
        any(_GLOBAL_HOOKS)
        or _forward_ad._current_level >= 0  # dual tensors: oneDNN's kernel has no forward derivative (tangent lost)
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._len_torch_function_stack()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch.get_float32_matmul_precision() != "highest"  # reduced-precision fp32 products are F.linear's
    )


class OneDNNLinear(torch.autograd.Function):
    """`F.linear(x, weight, bias)` on oneDNN: its forward, its weight gradient, and the input gradient of the
    decoder's shapes; the bias gradient (and a wide LM head's input gradient) are what F.linear's backward runs, as
    is every gradient under create_graph=True."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _KERNEL(x, weight, bias, "none", [], "")

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)  # saved tensors: an in-place change before backward raises, as for F.linear
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])  # (N, out)
        # create_graph=True (Hessian-vector products): F.linear's own products, which autograd can differentiate
        # again; oneDNN's kernel has no derivative, and what flowed through it would silently be left out.
        plain = torch.is_grad_enabled()
        grad_x = None
        if ctx.needs_input_grad[0]:  # (..., in)
            # oneDNN reads the weight transposed where it lies, 1.1-1.4x MKL's product for the decoder's shapes
            # (1024 rows); for a vocabulary-wide LM head MKL's is the faster one.
            wide = weight.shape[0] > 4 * weight.shape[1]
            grad_x = grad.matmul(weight) if wide or plain else _KERNEL(grad, weight.t(), None, "none", [], "")
        grad_w = None
        if ctx.needs_input_grad[1]:  # (out, in) = grad_2d.T @ x_2d
            x_2d = x.reshape(-1, x.shape[-1])
            # x_2d is read transposed where it lies, grad_2d.T copied (oneDNN's left operand is row-major); with
            # the copy the product ran 1.6-2.1x MKL's for OPT's shapes (1024 rows, AMD EPYC with full-width
            # AVX-512, where MKL runs AVX2 kernels). oneDNN refuses a product over zero rows.
            onednn = len(x_2d) and not plain
            grad_w = _KERNEL(grad_2d.t(), x_2d.t(), None, "none", [], "") if onednn else grad_2d.t().mm(x_2d)
        grad_b = grad_2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None  # (out,)
        return grad_x, grad_w, grad_b


def _route(module: nn.Module, x: torch.Tensor, check_context: bool = True) -> tuple[str, Any, Any]:
    """Which way `project` goes, with the module's weight and bias: "kernel" (nothing to record for autograd),
    "autograd" (OneDNNLinear), or "module" (`module(x)` itself). `check_context=False`: the caller has just
    checked `_context_is_plain`."""
    params = _plain_parameters(module) if _ENABLED and _AVAILABLE else None
    if params is None:
        return "module", None, None
    w, b = params
    # bf16 only on packed weights: oneDNN reorders a plain bf16 weight on every call, no faster than F.linear
    dtype = torch.bfloat16 if _PACKED and _BF16 and x.dtype is torch.bfloat16 else torch.float32
    if not (_plain_cpu(x, dtype) and _plain_cpu(w, dtype) and (b is None or _plain_cpu(b, dtype))):
        return "module", None, None
    if check_context and not _context_is_plain():
        return "module", None, None
    grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
    if grad and dtype is torch.bfloat16:
        return "module", None, None
    if ((grad and _MKL_TRAINS) or (_MKL_FIRST and x.numel() <= _MKL_ROWS * x.shape[-1])
            or (_MKL_MANY and x.numel() > _MKL_MANY_ROWS * x.shape[-1])):
        return "module", None, None
    return ("autograd" if grad else "kernel"), w, b


def eligible(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `project(module, x)` takes the oneDNN kernel (see the module's docstring for the conditions)."""
    return _route(module, x)[0] != "module"


def project(module: nn.Module, x: torch.Tensor, *, relu: bool = False,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """`module(x)`, computed by oneDNN's kernel when that is the same computation (see `eligible`); with
    `relu`, `F.relu(module(x))`, and with `residual`, `residual + ...`. On the kernel both run inside the product
    (oneDNN post-ops: no separate pass over the output), otherwise as those two torch calls; a module whose class
    has `forward_relu(x)` (the int8 mode's layer) runs its own fused ReLU when nothing hooks it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from optlite.cpu_linear import project
        >>> linear = nn.Linear(8, 4)
        >>> x, h = torch.randn(2, 3, 8), torch.randn(2, 3, 4)
        >>> with torch.no_grad():
        ...     torch.allclose(project(linear, x), linear(x), atol=1e-6)
        ...     torch.allclose(project(linear, x, relu=True, residual=h), h + linear(x).relu(), atol=1e-6)
        True
        True
    """
    route, weight, bias = _route(module, x)
    if route == "kernel" and _swaps(x):
        y = _swapped_product(x, weight, bias)
        y = y.relu_() if relu else y
    elif route == "kernel":
        weight = packed_weight(weight) if _PACKED else weight
        if residual is not None and not relu and _fusable_residual(residual, x, weight):
            return _KERNEL_ADD(x, residual, weight, bias, "add")
        y = _KERNEL(x, weight, bias, "relu" if relu else "none", [], "")
    elif relu and hasattr(type(module), "forward_relu") and _unhooked(module) and not any(_GLOBAL_HOOKS):
        y = module.forward_relu(x)  # a layer with a fused ReLU of its own (the int8 mode's)
    else:
        y = OneDNNLinear.apply(x, weight, bias) if route == "autograd" else module(x)
        y = F.relu(y) if relu else y
    return y if residual is None else residual + y


def _swaps(x: torch.Tensor) -> bool:
    """Whether an inference product of `x` runs as `_swapped_product`: 4 to 24 rows, plain weights, where `_SWAP`."""
    return _SWAP and not _PACKED and x.shape[-1] > 0 and _SWAP_ROWS[0] <= x.numel() // x.shape[-1] <= _SWAP_ROWS[1]


def _swapped_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed as `(weight @ x.T).T`, a contiguous output like F.linear's.

    For a few rows oneDNN's kernel copies the weight, the product's right-hand matrix, into its own blocked layout
    on every call; with the weight on the left it reads it where it lies. On an AVX2 AMD EPYC (2 threads, the
    decoder's products of opt-125m) that made 8 to 24 rows 1.15-1.23x faster (4 rows 1.14x in one run; 2 and 32
    rows level), and batch-8 greedy decoding 1.15x and 1.27x in two runs. Its outputs matched F.linear's to the bit
    there."""
    rows = x.numel() // x.shape[-1]
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    product = _KERNEL(weight, x.reshape(rows, -1).contiguous(), None, "none", [], "").t()  # (rows, out), strided
    if bias is None:
        out.view(rows, -1).copy_(product)
    else:
        torch.add(product, bias, out=out.view(rows, -1))
    return out


def _fusable_residual(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN adds a residual of the output's own shape and layout, a plain contiguous CPU tensor of x's dtype."""
    return (_plain_cpu(residual, x.dtype) and residual.is_contiguous() and not residual.requires_grad
            and residual.shape == (*x.shape[:-1], weight.shape[0]))


# ---- several projections of one input as one product


@torch.no_grad()
def share_storage(linears: Sequence[nn.Linear]) -> None:
    """Put the weights (and the biases) of `linears` back to back in one buffer, each Parameter becoming a view of
    it: same objects, values, shapes and state_dict, but `project_stacked` can then run them as one product.
    Left as they are when any is on the meta device or they differ in dtype, device or bias.

    Example:
        >>> from torch import nn
        >>> from optlite.cpu_linear import share_storage, stacked
        >>> q, k, v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        >>> share_storage([q, k, v])
        >>> stacked([q.weight, k.weight, v.weight]).shape
        torch.Size([24, 8])
    """
    groups = [[m.weight for m in linears]]
    if any(m.bias is not None for m in linears):
        groups.append([m.bias for m in linears])
    if all(all(t is not None for t in g) and stacked(g) is not None for g in groups):
        return  # already stacked (a load reads them into one buffer)
    for tensors in groups:
        first = tensors[0]
        if any(t is None or t.is_meta or t.dtype != first.dtype or t.device != first.device
               or t.shape[1:] != first.shape[1:] for t in tensors):
            return
    for tensors in groups:
        for t, view in zip(tensors, torch.cat(tensors).split([t.shape[0] for t in tensors]), strict=True):
            t.data = view


def stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One tensor over `tensors` (concatenated along dim 0) when they lie back to back, in order, in one storage,
    as `share_storage` leaves them; else None. Checked on every call: a weight replaced since (`.data = ...`,
    `.to()`, a GPTQ write) has storage of its own, and the projections run apart again."""
    first = tensors[0]
    if type(first) not in _PLAIN:  # a tensor subclass may have no storage of its own
        return None
    # Where each tensor's storage begins: equal means one storage (two live ones never start at one address).
    # Computed from data_ptr, as `untyped_storage()` costs a Python object per call.
    size = first.element_size()
    start, offset = first.data_ptr() - first.storage_offset() * size, first.storage_offset()
    for t in tensors:
        if (type(t) not in _PLAIN or not t.is_contiguous() or t.dtype is not first.dtype
                or t.shape[1:] != first.shape[1:] or t.storage_offset() != offset
                or t.data_ptr() - offset * size != start):
            return None
        offset += t.numel()
    return first.as_strided((sum(t.shape[0] for t in tensors), *first.shape[1:]), first.stride())


def project_stacked(modules: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """`[project(m, x) for m in modules]`, computed as one oneDNN product when every module takes the kernel and
    their weights and biases are stacked in one storage (`share_storage`): decoding's q/k/v read as one matrix.
    Modules whose class has `forward_stacked(modules, x)` (the int8 mode's layers) run that when nothing hooks
    them; it returns None where they share no product.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from optlite.cpu_linear import project_stacked, share_storage
        >>> q, k, v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        >>> share_storage([q, k, v])
        >>> x = torch.randn(1, 3, 8)
        >>> with torch.no_grad():
        ...     all(torch.allclose(a, m(x), atol=1e-6) for a, m in zip(project_stacked([q, k, v], x), [q, k, v]))
        True
    """
    stack = getattr(type(modules[0]), "forward_stacked", None)  # a shared product of its own (the int8 mode's)
    if stack is not None and all(_unhooked(m) for m in modules) and not any(_GLOBAL_HOOKS):
        out = stack(modules, x)
        if out is not None:
            return out
    routes = [] if _PACKED else [_route(modules[0], x)]
    if routes and routes[0][0] == "kernel":  # the others only then: else `project` routes each one anyway
        routes += [_route(m, x, check_context=False) for m in modules[1:]]
    if routes and all(route == "kernel" for route, _, _ in routes):
        weights, biases = [w for _, w, _ in routes], [b for _, _, b in routes]
        weight = stacked(weights)
        with_bias = [b is not None for b in biases]
        bias = stacked(biases) if all(with_bias) else None
        if weight is not None and (bias is not None or not any(with_bias)):
            out = _swapped_product(x, weight, bias) if _swaps(x) else _KERNEL(x, weight, bias, "none", [], "")
            return list(out.split([w.shape[0] for w in weights], dim=-1))
    return [project(m, x) for m in modules]
