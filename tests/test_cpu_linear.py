"""The oneDNN fp32 projections: parity with transformers, the path taken where eligible, `module(x)` everywhere
else (hooks, overrides, autograd, other dtypes, tensor subclasses, compile), and in-place weight changes seen."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from tiny import SHAPES, batch, make_pair, record
from torch import nn

from optlite import cpu_linear
from optlite.cpu_linear import eligible, onednn_enabled, project, use_onednn

pytestmark = pytest.mark.skipif(not onednn_enabled(), reason="this torch build has no oneDNN linear kernel")


@contextlib.contextmanager
def count_onednn(monkeypatch: pytest.MonkeyPatch, mkl_first: bool = False,
                 avx2_amd: bool = False) -> Iterator[list[int]]:
    """Count the oneDNN kernels' calls made by `project` (the real kernels still run), the residual-adding one
    included. The routing is an AVX-512 AMD CPU's whatever CPU the tests run on, or with `mkl_first` an Intel
    CPU's (one to three rows and training stay `module(x)`'s), or with `avx2_amd` an AVX2-only AMD CPU's (4 to 24
    rows as `(weight @ x.T).T`, more than 64 rows `module(x)`'s)."""
    calls = [0]

    def counted(real):
        def call(*args):
            calls[0] += 1
            return real(*args)
        return call

    with monkeypatch.context() as m:
        m.setattr(cpu_linear, "_MKL_FIRST", mkl_first)
        m.setattr(cpu_linear, "_MKL_TRAINS", mkl_first)
        m.setattr(cpu_linear, "_SWAP", avx2_amd)
        m.setattr(cpu_linear, "_MKL_MANY", avx2_amd)
        m.setattr(cpu_linear, "_KERNEL", counted(cpu_linear._KERNEL))
        m.setattr(cpu_linear, "_KERNEL_ADD", counted(cpu_linear._KERNEL_ADD))
        yield calls


def linear(bias: bool = True) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(16, 8, bias=bias), torch.randn(2, 3, 16)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("cls_name", ["OPTModel", "OPTForCausalLM"])
def test_forward_parity_with_the_onednn_path(monkeypatch, shape, cls_name):
    ref, ours = make_pair(cls_name, shape)
    ids, mask = batch("left")
    with torch.no_grad(), count_onednn(monkeypatch) as calls:
        a = ours(ids, attention_mask=mask)[0]
    n_layers = ours.config.num_hidden_layers
    # q/k/v as one product (their weights share one buffer), out, fc1, fc2 per layer; lm_head
    assert calls[0] == 4 * n_layers + (cls_name == "OPTForCausalLM")
    with torch.no_grad():
        b = ref(ids, attention_mask=mask)[0]
    assert record("onednn forward", a, b, relative=True) < 1e-5


def test_forward_on_a_wider_model_is_as_close_to_float64_as_fp32_gets(monkeypatch):
    # 512-wide products, where oneDNN and MKL sum in different orders (the tiny shapes above agree bit for bit), in
    # a model whose large random weights amplify fp32 rounding layer by layer: both fp32 results are compared with
    # the same model run in float64, relative to the largest logit (transformers' own fp32 is ~1.5e-5 off).
    ref, ours = make_pair("OPTForCausalLM", "pre_ln", hidden_size=512, ffn_dim=1024, num_attention_heads=8)
    ids, mask = batch("left")
    with torch.no_grad(), count_onednn(monkeypatch) as calls:
        a = ours(ids, attention_mask=mask).logits
    assert calls[0] == 4 * ours.config.num_hidden_layers + 1
    with torch.no_grad():
        exact = ref.double()(ids, attention_mask=mask).logits
    scale = exact.abs().max()
    assert record("onednn forward, 512 wide, vs float64 (of the largest)", a.double() / scale, exact / scale) < 3e-4


def test_greedy_generate_matches_transformers_on_the_onednn_path(monkeypatch):
    ref, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, mask = batch("left")
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1)
    with count_onednn(monkeypatch) as calls:
        got = ours.generate(ids, **kw)
    # the prefill and 7 steps (the 8th token needs no forward), each with q/k/v as one product
    assert calls[0] == 8 * (4 * ours.config.num_hidden_layers + 1)
    assert torch.equal(got, ref.generate(ids, **kw))


@pytest.mark.parametrize("rows", [3, 4, 8, 24, 25])
@pytest.mark.parametrize("bias", [True, False])
def test_four_to_24_rows_run_swapped_on_an_avx2_amd_cpu(monkeypatch, rows, bias):
    layer, _ = linear(bias)
    x, h = torch.randn(rows, 16), torch.randn(rows, 8)
    swapped = []
    real = cpu_linear._swapped_product
    monkeypatch.setattr(cpu_linear, "_swapped_product", lambda *a: swapped.append(a[0].shape) or real(*a))
    with torch.no_grad(), count_onednn(monkeypatch, avx2_amd=True) as calls:
        got = [project(layer, x), project(layer, x, relu=True), project(layer, x, residual=h),
               project(layer, x, relu=True, residual=h), project(layer, x.t().contiguous().t())]  # strided input
    assert calls[0] == 5 and len(swapped) == (5 if 4 <= rows <= 24 else 0)
    with torch.no_grad():
        y = layer(x)
    for a, b in zip(got, [y, y.relu(), h + y, h + y.relu(), y], strict=True):
        assert a.is_contiguous() and a.shape == b.shape
        assert record("onednn swapped rows", a, b, relative=True) < 1e-6


def test_batched_generate_matches_transformers_with_swapped_products(monkeypatch):
    ref, ours = make_pair("OPTForCausalLM", "post_ln_proj")
    ids, mask = batch("left")
    ids, mask = torch.cat([ids, ids.flip(0)]), torch.cat([mask, mask.flip(0)])  # 6 rows: each step swapped
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1)
    swapped = []
    real = cpu_linear._swapped_product
    monkeypatch.setattr(cpu_linear, "_swapped_product", lambda *a: swapped.append(a[0].shape) or real(*a))
    with count_onednn(monkeypatch, avx2_amd=True):
        got = ours.generate(ids, **kw)
        with torch.no_grad():
            logits = ours(ids[:4, :5], attention_mask=mask[:4, :5]).logits  # 20 rows
    per_forward = 4 * ours.config.num_hidden_layers + 1  # q/k/v as one, out, fc1, fc2; the head
    steps = got.shape[1] - ids.shape[1] - 1
    # the prefill's 42 rows as before but its head's 6 (the last positions), 6 rows a step, then the 20-row forward
    assert steps > 0 and [n[0] for n in swapped] == [6] * (1 + steps * per_forward) + [4] * per_forward
    assert torch.equal(got, ref.generate(ids, **kw))
    with torch.no_grad():
        want = ref(ids[:4, :5], attention_mask=mask[:4, :5]).logits
    assert record("onednn swapped forward", logits, want, relative=True) < 1e-5


@pytest.mark.parametrize("routing, rows, kernel", [
    ("intel", 1, False), ("intel", 3, False), ("intel", 4, True),  # one to three rows stay MKL's
    ("avx2_amd", 64, True), ("avx2_amd", 65, False), ("avx2_amd", 512, False),  # more than 64 rows stay MKL's
])
def test_rows_that_stay_with_the_module(monkeypatch, routing, rows, kernel):
    layer, _ = linear()
    x, h = torch.randn(1, rows, 16), torch.randn(1, rows, 8)
    cpu = dict(mkl_first=True) if routing == "intel" else dict(avx2_amd=True)
    with torch.no_grad(), count_onednn(monkeypatch, **cpu) as calls:
        takes_kernel = eligible(layer, x)
        got = project(layer, x, relu=True, residual=h)
    assert takes_kernel == kernel and calls[0] == kernel
    with torch.no_grad():
        want = h + layer(x).relu()
    if kernel:
        assert record(f"onednn {rows} rows", got, want, relative=True) < 1e-6
    else:  # F.linear, then torch's relu and add: the module call itself
        assert torch.equal(got, want)


def test_greedy_generate_matches_transformers_with_intel_cpu_routing(monkeypatch):
    ref, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, mask = batch("left")  # 3 rows: the prefill's 21 on oneDNN, each step's 3 (and the logits' 3) on MKL
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1)
    with count_onednn(monkeypatch, mkl_first=True) as calls:
        got = ours.generate(ids, **kw)
    assert calls[0] == 4 * ours.config.num_hidden_layers
    assert torch.equal(got, ref.generate(ids, **kw))


def test_training_stays_with_the_module_on_an_intel_cpu(monkeypatch):
    ref, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, mask = batch("none")
    ours.train()
    with count_onednn(monkeypatch, mkl_first=True) as calls:
        ours(ids, attention_mask=mask, labels=ids).loss.backward()
    assert calls[0] == 0
    with count_onednn(monkeypatch, mkl_first=True) as calls, torch.no_grad():
        ours(ids, attention_mask=mask)  # the same model, 21 rows, outside autograd
    assert calls[0] == 4 * ours.config.num_hidden_layers + 1


def test_only_an_intel_cpu_with_mkl_keeps_mkl_first():
    assert cpu_linear.mkl_first("GenuineIntel", mkl=True)
    assert not cpu_linear.mkl_first("GenuineIntel", mkl=False)  # a torch built with another BLAS
    assert not cpu_linear.mkl_first("AuthenticAMD", mkl=True)
    assert not cpu_linear.mkl_first("", mkl=True)


def test_training_stays_mkl_on_intel_and_on_cpus_without_avx512():
    assert cpu_linear.mkl_trains("GenuineIntel", mkl=True, avx512=True)
    assert cpu_linear.mkl_trains("AuthenticAMD", mkl=True, avx512=False)
    assert not cpu_linear.mkl_trains("AuthenticAMD", mkl=True, avx512=True)
    assert not cpu_linear.mkl_trains("AuthenticAMD", mkl=False, avx512=False)  # the rule keeps MKL, not another BLAS


@pytest.mark.parametrize("bias", [True, False])
def test_project_equals_module_call(bias):
    layer, x = linear(bias)
    with torch.no_grad():
        assert eligible(layer, x)
        assert record("onednn project", project(layer, x), layer(x), relative=True) < 1e-6
        assert record("onednn project 2-D", project(layer, x[0]), layer(x[0]), relative=True) < 1e-6
        strided = x.transpose(0, 1)  # non-contiguous input
        assert record("onednn project strided", project(layer, strided), layer(strided), relative=True) < 1e-6


@pytest.mark.parametrize("hooked", [False, True])
def test_relu_and_residual_equal_the_separate_calls(monkeypatch, hooked):
    layer, x = linear()
    if hooked:  # the module call, then torch's relu and add
        layer.register_forward_hook(lambda mod, a, out: None)
    h = torch.randn(2, 3, 8)
    with torch.no_grad(), count_onednn(monkeypatch) as calls:
        relu = project(layer, x, relu=True)
        added = project(layer, x, residual=h)
        both = project(layer, x, relu=True, residual=h)
        strided = project(layer, x, residual=h.transpose(0, 1).contiguous().transpose(0, 1))  # added after
        broadcast = project(layer, x, residual=h[:1])
    assert calls[0] == (0 if hooked else 5)  # relu and the residual run inside the product, or after it
    with torch.no_grad():
        y = layer(x)
    for name, got, want in [("relu", relu, y.relu()), ("residual", added, h + y), ("both", both, h + y.relu()),
                            ("strided residual", strided, h + y), ("broadcast residual", broadcast, h[:1] + y)]:
        assert got.shape == want.shape
        if hooked:
            assert torch.equal(got, want), name
        else:
            assert record(f"onednn {name}", got, want, relative=True) < 1e-6, name


def test_decoder_layers_fuse_relu_and_the_feed_forward_residual_outside_training(monkeypatch):
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    kernels = {"relu": 0, "add": 0}
    real, real_add = cpu_linear._KERNEL, cpu_linear._KERNEL_ADD

    def kernel(x, w, b, attr, *args):
        kernels["relu"] += attr == "relu"
        return real(x, w, b, attr, *args)

    def kernel_add(*args):
        kernels["add"] += 1
        return real_add(*args)

    monkeypatch.setattr(cpu_linear, "_KERNEL", kernel)
    monkeypatch.setattr(cpu_linear, "_KERNEL_ADD", kernel_add)
    monkeypatch.setattr(cpu_linear, "_SWAP", False)  # 21 rows: the fused kernels, not the swapped product
    monkeypatch.setattr(cpu_linear, "_MKL_MANY", False)
    ids, mask = batch("none")
    with torch.no_grad():
        ours(ids, attention_mask=mask)
    assert kernels == {"relu": ours.config.num_hidden_layers, "add": ours.config.num_hidden_layers}


def test_residual_that_needs_a_gradient_keeps_it():
    layer, x = linear()
    layer.requires_grad_(False)
    h = torch.randn(2, 3, 8, requires_grad=True)
    out = project(layer, x, residual=h)
    (grad,) = torch.autograd.grad(out.sum(), [h])
    assert torch.equal(grad, torch.ones_like(h))


def ineligible_cases() -> dict[str, object]:
    """Each builds (module, x) in a state where `project` must call `module(x)`; some return a context too."""
    def hooked(register):
        layer, x = linear()
        register(layer)
        return layer, x

    def forward_override():
        layer, x = linear()
        layer.forward = lambda inp: nn.functional.linear(inp, layer.weight, layer.bias)  # as accelerate does
        return layer, x

    def subclass():
        class MyLinear(nn.Linear):
            pass

        torch.manual_seed(0)
        return MyLinear(16, 8), torch.randn(2, 3, 16)

    def bf16():
        layer, x = linear()
        return layer.to(torch.bfloat16), x.to(torch.bfloat16)

    def double():
        layer, x = linear()
        return layer.double(), x.double()

    def attribute(name):  # a parameter replaced by a plain tensor attribute, which F.linear then reads
        layer, x = linear()
        value = getattr(layer, name).detach() * 2
        delattr(layer, name)
        setattr(layer, name, value)
        return layer, x

    return {
        "weight as a plain attribute": lambda: attribute("weight"),
        "bias as a plain attribute": lambda: attribute("bias"),
        "forward hook": lambda: hooked(lambda m: m.register_forward_hook(lambda mod, a, out: None)),
        "forward pre-hook": lambda: hooked(lambda m: m.register_forward_pre_hook(lambda mod, a: None)),
        "full backward hook": lambda: hooked(lambda m: m.register_full_backward_hook(lambda mod, gi, go: None)),
        "forward override": forward_override,
        "nn.Linear subclass": subclass,
        "bfloat16": bf16,
        "float64": double,
    }


@pytest.mark.parametrize("case", list(ineligible_cases()))
def test_ineligible_modules_fall_back_to_the_module_call(monkeypatch, case):
    layer, x = ineligible_cases()[case]()
    with torch.no_grad(), count_onednn(monkeypatch) as calls:
        y = project(layer, x)
    assert calls[0] == 0
    assert torch.equal(y, layer(x).detach())  # exactly the module call
    assert not eligible(layer, x)


@contextlib.contextmanager
def global_forward_hook() -> Iterator[None]:
    handle = nn.modules.module.register_module_forward_hook(lambda mod, a, out: None)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("context", ["global hook", "autocast", "tracing", "function mode",
                                     "matmul precision"])
def test_ineligible_contexts_fall_back(monkeypatch, context):
    layer, x = linear()
    contexts = {
        "global hook": global_forward_hook,
        "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        "tracing": lambda: monkeypatch.context(),
        "function mode": PassThroughMode,
        "matmul precision": lambda: precision("medium"),
    }
    if context == "tracing":
        monkeypatch.setattr(cpu_linear.torch.jit, "is_tracing", lambda: True)
    with torch.no_grad():
        with contexts[context](), count_onednn(monkeypatch) as calls:
            y = project(layer, x)
    assert calls[0] == 0
    if context == "autocast":
        assert y.dtype == torch.bfloat16  # the module call was autocast, as F.linear is


class PassThroughMode(torch.overrides.TorchFunctionMode):
    """A mode that sees every torch call, as FlopCounterMode and device contexts do."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def precision(value: str) -> Iterator[None]:
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("out_features", [8, 80])  # 80: wider than 4x its input, an LM head's input gradient
def test_gradients_through_the_onednn_forward_equal_f_linear(monkeypatch, bias, frozen, out_features):
    layer, x = linear(bias)
    if out_features != 8:
        layer = nn.Linear(16, out_features, bias=bias)
    layer.requires_grad_(not frozen)
    x = x.transpose(0, 1).requires_grad_(True)  # a non-contiguous (3, 2, 16) leaf
    grad_out = torch.randn(3, 2, out_features)
    with count_onednn(monkeypatch) as calls:
        y = project(layer, x)
        assert calls[0] == 1 and y.grad_fn is not None
        got = torch.autograd.grad(y, [x, *[p for p in layer.parameters() if p.requires_grad]], grad_out)
    # the input gradient on oneDNN, except for a wide layer, and the weight gradient when there is one
    assert calls[0] == 1 + (out_features == 8) + (not frozen)
    want = torch.autograd.grad(layer(x), [x, *[p for p in layer.parameters() if p.requires_grad]], grad_out)
    assert len(got) == len(want) == (1 if frozen else 2 + bias)
    for g, w in zip(got, want, strict=True):
        assert record("onednn gradients", g, w, relative=True) < 1e-5


@pytest.mark.parametrize("out_features", [8, 80])
def test_second_order_gradients_equal_f_linears(monkeypatch, out_features):
    """create_graph=True, as Hessian-vector products (OBS-style pruning, second-order optimizers) take it: the
    gradient's own gradient must not go through oneDNN's kernel, which has no derivative."""
    torch.manual_seed(0)
    layer = nn.Linear(16, out_features)
    x = torch.randn(4, 16, requires_grad=True)

    def second_order(y, calls=None):
        grads = torch.autograd.grad((y ** 2).sum(), [layer.weight, x], create_graph=True)
        if calls is not None:
            assert calls[0] == 1  # the forward: the differentiable backward took none of oneDNN's products
        return torch.autograd.grad(sum(g.sum() for g in grads), [x, layer.weight, layer.bias])

    with count_onednn(monkeypatch) as calls:
        got = second_order(project(layer, x), calls)
    want = second_order(layer(x))
    for g, w in zip(got, want, strict=True):
        assert record("onednn second-order gradients", g, w, relative=True) < 1e-5


@pytest.mark.parametrize("frozen", [True, False])
def test_forward_mode_tangents_equal_the_modules(monkeypatch, frozen):
    """Dual tensors (torch.autograd.forward_ad) go to the module: oneDNN's kernel has no forward derivative, and its
    output would come back without a tangent."""
    layer = nn.Linear(16, 8).requires_grad_(not frozen)
    x, tangent = torch.randn(2, 4, 16).unbind(0)
    with count_onednn(monkeypatch) as calls, fwAD.dual_level():
        dual = fwAD.make_dual(x, tangent)
        got, want = fwAD.unpack_dual(project(layer, dual)), fwAD.unpack_dual(layer(dual))
    assert calls[0] == 0
    assert torch.equal(got.primal, want.primal) and torch.equal(got.tangent, want.tangent)


@pytest.mark.parametrize("shape", ["pre_ln", "post_ln_proj"])
def test_forward_mode_jacobian_vector_product_matches_transformers(shape):
    """A JVP of the hidden states along a direction of the input embeddings, as linearisation studies take it;
    with eager attention (SDPA's CPU kernel has no forward derivative in either library)."""
    ref, ours = make_pair("OPTModel", shape, attn_implementation="eager")
    ids, mask = batch("left")
    tangents = []
    for model in (ref, ours):
        embeds = model.get_input_embeddings()(ids).detach()
        direction = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), fwAD.dual_level():
            out = model(inputs_embeds=fwAD.make_dual(embeds, direction), attention_mask=mask, output_attentions=True)
            tangents.append(fwAD.unpack_dual(out.last_hidden_state).tangent)
    assert tangents[1] is not None
    assert record("forward-mode tangents", tangents[1], tangents[0], relative=True) < 1e-5


def test_gradients_of_an_empty_batch_are_f_linears(monkeypatch):
    layer = nn.Linear(16, 8)
    x = torch.randn(0, 16, requires_grad=True)
    with count_onednn(monkeypatch) as calls:
        got = torch.autograd.grad(project(layer, x).sum(), [x, layer.weight, layer.bias])
    assert calls[0] == 2  # the forward and the input gradient; oneDNN refuses a weight gradient over zero rows
    want = torch.autograd.grad(layer(x).sum(), [x, layer.weight, layer.bias])
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.equal(g, w)


def test_training_step_gradients_match_transformers(monkeypatch):
    ref, ours = make_pair("OPTForCausalLM", "post_ln_proj")
    ids, mask = batch("right")
    for m in (ref, ours):
        m.train()
        m(ids, attention_mask=mask, labels=ids).loss.backward()
    with count_onednn(monkeypatch) as calls:
        ours(ids, attention_mask=mask, labels=ids)
    assert calls[0] == 6 * ours.config.num_hidden_layers + 1  # with gradients q/k/v run apart, stacked or not
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert record("onednn train gradients", p.grad, grads[name].grad, relative=True) < 1e-5, name


def test_frozen_model_without_grad_inputs_takes_the_path(monkeypatch):
    layer, x = linear()
    layer.requires_grad_(False)
    with count_onednn(monkeypatch) as calls:
        project(layer, x)
    assert calls[0] == 1


def test_tensor_subclass_weight_falls_back(monkeypatch):
    class Wrapped(torch.Tensor):  # stands in for torchao's quantized weights, which are tensor subclasses
        pass

    layer, x = linear()
    layer.weight = nn.Parameter(layer.weight.detach().as_subclass(Wrapped), requires_grad=False)
    with torch.no_grad(), count_onednn(monkeypatch) as calls:
        project(layer, x)
    assert calls[0] == 0


def test_compiled_model_does_not_take_the_path(monkeypatch):
    layer, x = linear()
    compiled = torch.compile(lambda inp: project(layer, inp), backend="eager", fullgraph=True)
    with torch.no_grad(), count_onednn(monkeypatch) as calls:
        y = compiled(x)
    assert calls[0] == 0
    assert record("onednn compiled fallback", y, layer(x).detach(), relative=True) < 1e-6


def test_switch_turns_the_path_off(monkeypatch):
    layer, x = linear()
    try:
        use_onednn(False)
        with torch.no_grad(), count_onednn(monkeypatch) as calls:
            project(layer, x)
        assert calls[0] == 0 and not onednn_enabled()
    finally:
        use_onednn(True)
    with torch.no_grad(), count_onednn(monkeypatch) as calls:
        project(layer, x)
    assert calls[0] == 1


def change_weight(layer: nn.Linear, x: torch.Tensor, change: str) -> None:
    """Change `layer.weight` the way `change` names: an optimizer step, in place, or new storage through `.data`."""
    if change in ("optimizer step", "fused AdamW step"):
        opt = (torch.optim.SGD(layer.parameters(), lr=0.5) if change == "optimizer step"
               else torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True))
        layer(x).square().sum().backward()
        opt.step()
    elif change == "mul_":
        with torch.no_grad():
            layer.weight.mul_(2.0)
    else:
        layer.weight.data = torch.randn_like(layer.weight)


@pytest.mark.parametrize("change", ["optimizer step", "mul_", "data ="])
def test_weights_changed_in_place_are_seen_at_once(change):
    layer, x = linear()
    with torch.no_grad():
        before = project(layer, x)
    change_weight(layer, x, change)
    with torch.no_grad():
        after = project(layer, x)
        assert not torch.allclose(before, after)
        assert record("onednn after weight change", after, layer(x), relative=True) < 1e-6


def test_forward_hook_on_a_projection_fires_in_the_model():
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    fired = []
    ours.model.decoder.layers[0].fc1.register_forward_hook(lambda mod, a, out: fired.append(out.shape))
    ours.lm_head.register_forward_hook(lambda mod, a, out: fired.append(out.shape))
    ids, mask = batch("none")
    with torch.no_grad():
        ours(ids, attention_mask=mask)
    assert fired == [torch.Size([3, 7, 48]), torch.Size([3, 7, 99])]


@pytest.fixture
def packed() -> Iterator[None]:
    use_onednn(True, packed=True)
    try:
        yield
    finally:
        use_onednn(True)


def test_packed_weights_give_transformers_outputs_and_tokens(packed):
    ref, ours = make_pair("OPTForCausalLM", "post_ln_proj")
    ids, mask = batch("left")
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    assert record("onednn packed forward", a, b, relative=True) < 1e-5
    assert len(cpu_linear._PACKS) == 6 * ours.config.num_hidden_layers + 1  # each projection and the lm_head
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.parametrize("change", ["fused AdamW step", "mul_", "data ="])
def test_packed_copies_are_remade_when_weights_change(packed, change):
    layer, x = linear()
    with torch.no_grad():
        before = project(layer, x)
    first = cpu_linear._PACKS[layer.weight][2]
    change_weight(layer, x, change)
    with torch.no_grad():
        after = project(layer, x)
        assert cpu_linear._PACKS[layer.weight][2] is not first
        assert not torch.allclose(before, after)
        assert record("onednn packed after weight change", after, layer(x), relative=True) < 1e-6


def test_packed_copy_is_reused_while_the_weight_is_unchanged(packed):
    layer, x = linear()
    with torch.no_grad():
        project(layer, x)
        first = cpu_linear._PACKS[layer.weight][2]
        project(layer, x[:1])
    assert cpu_linear._PACKS[layer.weight][2] is first


def test_packed_copies_are_dropped_when_turned_off_and_with_their_module(packed):
    layer, x = linear()
    with torch.no_grad():
        project(layer, x)
    del layer
    assert not len(cpu_linear._PACKS)
    layer, x = linear()
    with torch.no_grad():
        project(layer, x)
    use_onednn(True)
    assert not len(cpu_linear._PACKS)


@pytest.mark.skipif(not cpu_linear._BF16, reason="oneDNN runs no bf16 products on this CPU")
@pytest.mark.parametrize("shape", ["pre_ln", "post_ln_proj", "no_bias_no_affine"])
def test_packed_bf16_weights_give_transformers_bf16_outputs(monkeypatch, packed, shape):
    ref, ours = make_pair("OPTForCausalLM", shape)
    ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    ids, mask = batch("left")
    with torch.no_grad(), count_onednn(monkeypatch) as calls:
        a = ours(ids, attention_mask=mask).logits.float()
    assert calls[0] == 6 * ours.config.num_hidden_layers + 1  # packed: q/k/v apart, out, fc1, fc2; lm_head
    assert all(p.dtype == torch.bfloat16 for _, _, p in cpu_linear._PACKS.values())
    with torch.no_grad():
        b = ref(ids, attention_mask=mask).logits.float()
    keep, scale = mask.bool(), b.abs().max()
    # the same bf16 products summed in another order: within bf16's rounding of the largest logit
    assert record("onednn packed bf16 forward (of the largest)", a[keep] / scale, b[keep] / scale) < 3e-2


def test_bf16_stays_with_the_module_unless_packed_and_without_grad(monkeypatch, packed):
    layer, x = linear()
    layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    with torch.no_grad():
        assert eligible(layer, x) == cpu_linear._BF16
        monkeypatch.setattr(cpu_linear, "_PACKED", False)
        assert not eligible(layer, x)
    monkeypatch.undo()
    assert not eligible(layer, x)  # grad enabled and the weight requires it: F.linear and its backward
