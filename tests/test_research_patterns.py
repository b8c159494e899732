"""Post-training quantization and pruning recipes as research scripts write them for transformers' OPT, run on
optlite and on transformers with the same weights: layer-by-layer calibration from a catcher on layers[0] with
hooks on every nn.Linear, round-to-nearest quantization, Wanda-style pruning (|W| * ||X||), and folding a
LayerNorm scale into q/k/v (SmoothQuant-style). The perplexities must agree."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_layers import Catcher, hidden
from tiny import batch, make_pair, record
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


def perplexity(model: nn.Module, ids: torch.Tensor) -> float:
    return torch.exp(model(ids, labels=ids).loss).item()


def linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules() if type(m) is nn.Linear}  # how the scripts find them


def calibration_inputs(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    layers = model.model.decoder.layers
    catcher = Catcher(layers[0])
    layers[0] = catcher
    try:
        model(ids)
    except ValueError:
        pass
    finally:
        layers[0] = catcher.layer
    return catcher.inputs[0], {"attention_mask": catcher.kwargs[0]["attention_mask"]}


def sequential(model: nn.Module, ids: torch.Tensor, edit: Callable[[nn.Linear, torch.Tensor], None]) -> None:
    """For each layer in turn: collect the squared input norm of each column of every Linear, edit the weights in
    place, then feed the edited layer's output to the next layer (as GPTQ and SparseGPT do)."""
    x, kwargs = calibration_inputs(model, ids)
    for layer in model.model.decoder.layers:
        norms, handles = {}, []
        for name, lin in linears(layer).items():
            def hook(m, args, out, name=name, norms=norms):
                cols = args[0].reshape(-1, m.in_features)
                norms[name] = norms.get(name, 0) + cols.pow(2).sum(0)
            handles.append(lin.register_forward_hook(hook))
        layer(x, **kwargs)
        for h in handles:
            h.remove()
        assert len(norms) == 6  # q, k, v, out_proj, fc1, fc2 all seen
        for name, lin in linears(layer).items():
            edit(lin, norms[name])
        x = hidden(layer(x, **kwargs))


def rtn_4bit(lin: nn.Linear, _: torch.Tensor) -> None:
    """Round to nearest on a per-row min/max grid of 16 levels."""
    w = lin.weight.data
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    scale = (hi - lo).clamp(min=1e-8) / 15
    w.copy_(torch.round((w - lo) / scale) * scale + lo)


def wanda_half(lin: nn.Linear, sq_norms: torch.Tensor) -> None:
    """Zero the half of each row with the smallest |W| * ||X|| (Wanda's score)."""
    score = lin.weight.data.abs() * sq_norms.sqrt()[None, :]
    drop = score.argsort(dim=1)[:, : lin.in_features // 2]
    lin.weight.data.scatter_(1, drop, 0.0)


@pytest.mark.parametrize("edit", [rtn_4bit, wanda_half], ids=["rtn", "wanda"])
@pytest.mark.parametrize("shape", ["pre_ln", "post_ln_proj"])
@torch.no_grad()
def test_layerwise_quantization_and_pruning_give_transformers_perplexity(shape, edit):
    ref, ours = make_pair("OPTForCausalLM", shape)
    calib, _ = batch("none", seed=1)
    held_out, _ = batch("none", seed=2)
    before = perplexity(ours, held_out)
    for model in (ours, ref):
        sequential(model, calib, edit)
    after, theirs = perplexity(ours, held_out), perplexity(ref, held_out)
    assert after != before  # every layer was edited, nothing silently skipped
    assert record(f"ppl after {edit.__name__}", torch.tensor(after), torch.tensor(theirs), relative=True) < 1e-5
    for (name, a), b in zip(linears(ours.model.decoder.layers).items(),
                            linears(ref.model.decoder.layers).values(), strict=True):
        assert torch.equal(a.weight, b.weight), name
        if edit is wanda_half:
            assert (a.weight == 0).sum().item() == a.weight.numel() // 2
        else:
            assert all(len(row.unique()) <= 16 for row in a.weight)


def fold_layer_norm_scale(model: nn.Module, ids: torch.Tensor) -> None:
    """SmoothQuant-style: divide each self_attn_layer_norm's output channels by s and multiply q/k/v's input
    columns by s, with s from the activations' and weights' channel maxima; the function is unchanged."""
    maxima, handles = {}, []
    for i, layer in enumerate(model.model.decoder.layers):
        def hook(m, args, out, i=i):
            maxima[i] = out.abs().reshape(-1, out.shape[-1]).amax(0)
        handles.append(layer.self_attn_layer_norm.register_forward_hook(hook))
    model(ids)
    for h in handles:
        h.remove()
    for i, layer in enumerate(model.model.decoder.layers):
        attn, ln = layer.self_attn, layer.self_attn_layer_norm
        w_max = torch.cat([p.weight.abs() for p in (attn.q_proj, attn.k_proj, attn.v_proj)]).amax(0)
        s = (maxima[i].sqrt() / w_max.sqrt()).clamp(min=1e-5)
        ln.weight.div_(s)
        ln.bias.div_(s)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.weight.mul_(s[None, :])


@torch.no_grad()
def test_folding_a_layer_norm_scale_into_qkv_leaves_the_logits_unchanged():
    ref, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, mask = batch("left")
    before = ours(ids, attention_mask=mask).logits
    q_weight = ours.model.decoder.layers[0].self_attn.q_proj.weight.clone()
    for model in (ours, ref):
        fold_layer_norm_scale(model, ids)
    after = ours(ids, attention_mask=mask).logits
    assert not torch.equal(ours.model.decoder.layers[0].self_attn.q_proj.weight, q_weight)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # a rescaling, up to fp32 rounding
    assert record("logits after LN folding", after, ref(ids, attention_mask=mask).logits, relative=True) < 1e-5
