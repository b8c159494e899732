"""The blockwise language-modelling loss: F.cross_entropy's value and gradients (first and second order), with
ignored targets, across block boundaries, under torch.func, and inside a model's training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import make_pair, record

from optlite import cross_entropy as ce
from optlite.cross_entropy import IGNORE_INDEX, cross_entropy


def logits_and_targets(n: int = 37, v: int = 301, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, v, generator=g) * scale
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = IGNORE_INDEX
    return logits, targets


def loss_and_grad(fn, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.clone().requires_grad_()
    loss = fn(x, targets)
    loss.backward()
    return loss.detach(), x.grad


def torch_loss(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(x, targets, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("block_elements", [1 << 20, 301 * 4, 1000])  # one block; 4 rows; 3 rows, ragged last
@pytest.mark.parametrize("scale", [3.0, 300.0])  # large logits: exp would overflow without the row maxima
def test_value_and_gradient_equal_f_cross_entropy(monkeypatch, block_elements, scale):
    monkeypatch.setattr(ce, "_BLOCK_ELEMENTS", block_elements)
    logits, targets = logits_and_targets(scale=scale)
    got, got_grad = loss_and_grad(cross_entropy, logits, targets)
    want, want_grad = loss_and_grad(torch_loss, logits, targets)
    exact, exact_grad = loss_and_grad(torch_loss, logits.double(), targets)
    assert record("blockwise cross entropy", got, want, relative=True) < 1e-6
    top = exact_grad.abs().max()
    # torch's own fp32 gradient is ~6e-6 of the largest off float64 at OPT's vocabulary; this one ~2e-7
    assert record("blockwise cross entropy gradient vs float64", got_grad.double() / top, exact_grad / top) < 1e-6
    assert record("blockwise cross entropy gradient", got_grad, want_grad, relative=True) < 1e-5
    assert record("blockwise cross entropy vs float64", got.double(), exact, relative=True) < 1e-6


def test_every_target_ignored_gives_nan_and_zero_gradient_as_torch():
    logits = torch.randn(3, 7)
    targets = torch.full((3,), IGNORE_INDEX)
    got, got_grad = loss_and_grad(cross_entropy, logits, targets)
    want, want_grad = loss_and_grad(torch_loss, logits, targets)
    assert torch.isnan(got) and torch.isnan(want)
    assert torch.equal(got_grad, want_grad) and not got_grad.any()


def test_second_order_gradient_equals_torchs():
    # A Hessian-vector product, as influence functions take: backward with create_graph, then again.
    logits, targets = logits_and_targets()
    v = torch.randn_like(logits)

    def hvp(fn):
        x = logits.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(x, targets), x, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), x)
        return g.detach(), h

    (g, h), (want_g, want_h) = hvp(cross_entropy), hvp(torch_loss)
    assert record("blockwise cross entropy, create_graph gradient", g, want_g, relative=True) < 1e-5
    assert record("blockwise cross entropy, Hessian-vector product", h, want_h, relative=True) < 1e-5


def test_torch_func_grad_and_vmap_run_torchs_loss():
    logits, targets = logits_and_targets(n=6)
    got = torch.func.vmap(torch.func.grad(lambda x, t: cross_entropy(x[None], t[None])))(logits, targets.clamp(min=0))
    want = torch.stack([loss_and_grad(torch_loss, x[None], t[None])[1][0]
                        for x, t in zip(logits, targets.clamp(min=0), strict=True)])
    assert record("blockwise cross entropy under vmap(grad)", got, want, relative=True) < 1e-6


def test_causal_lm_training_step_matches_transformers_on_the_loss():
    ref, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    a, b = ours(ids, labels=labels), ref(ids, labels=labels)
    assert type(a.loss.grad_fn).__name__ == "_CrossEntropyBackward"  # the blockwise loss, not a fallback
    a.loss.backward()
    b.loss.backward()
    assert record("causal LM loss", a.loss.detach(), b.loss.detach(), relative=True) < 1e-6
    got, want = ours.lm_head.weight.grad, ref.lm_head.weight.grad
    assert record("causal LM loss, tied head gradient", got, want, relative=True) < 1e-5


def test_other_devices_run_torchs_loss():
    # Blocks pay on the CPU's caches; on a GPU they would be kernel launches. The meta device stands in for one.
    logits = torch.randn(4, 9, device="meta", requires_grad=True)
    loss = cross_entropy(logits, torch.zeros(4, dtype=torch.long, device="meta"))
    assert loss.is_meta and type(loss.grad_fn).__name__ == "NllLossBackward0"
