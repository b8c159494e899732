"""Attention on AMD CPUs: causal attention by blocks of queries and bf16/fp16 attention in fp32 give SDPA's results
(and transformers' outputs), and SDPA itself runs wherever they are not taken (autograd, dropout, a past, large
score blocks, compile, autocast, other CPUs)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from tiny import SHAPES, batch, make_pair, record

from optlite import cpu_attention
from optlite.cpu_attention import _blockwise, _inference_on_cpu, _only_causal, attention

FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


@pytest.fixture(autouse=True)
def amd_cpu(monkeypatch):
    """The blocks as an AMD CPU at 2 threads takes them, whatever CPU and thread count the tests run with."""
    monkeypatch.setattr(cpu_attention, "_ON", True)
    monkeypatch.setattr(cpu_attention, "_MAX_THREADS", max(2, torch.get_num_threads()))


def qkv(B: int, H: int, T: int, D: int, seed: int = 0, **kw) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn(3, B, H, T, D, generator=g).to(**kw).unbind(0))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attention(q, k, v, is_causal=True)


def takes_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return _inference_on_cpu(q, k, v, None) and _blockwise(q, k, v)


def kernels(fn, *args) -> set[str]:
    """The aten ops `fn(*args)` ran."""
    with torch.profiler.profile() as prof:
        fn(*args)
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("shape", [(1, 2, 65, 8), (2, 3, 200, 16), (1, 4, 128, 8), (3, 1, 129, 4)])
def test_blocks_equal_sdpa(shape):
    q, k, v = qkv(*shape)
    assert takes_blocks(q, k, v)
    with torch.inference_mode():
        assert FLASH not in kernels(causal_attention, q, k, v)
        got = causal_attention(q, k, v)
    assert record("blockwise causal attention", got, sdpa(q, k, v)) < 1e-5


def test_blocks_read_strided_queries_keys_and_values():
    # The model's q/k/v are (B, T, H, D) column blocks of one product's output, transposed to (B, H, T, D).
    B, T, H, D = 2, 150, 3, 8
    y = torch.randn(B, T, 3 * H * D)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in y.split(H * D, dim=-1))
    assert takes_blocks(q, k, v)
    with torch.no_grad():
        assert record("blockwise causal attention", causal_attention(q, k, v), sdpa(q, k, v)) < 1e-5


@pytest.mark.parametrize("case", ["one block", "bf16", "a past", "autograd", "scores over the bound", "compile",
                                  "autocast", "not an AMD CPU", "more threads than measured"])
def test_cases_that_run_sdpa(monkeypatch, case):
    q, k, v = qkv(1, 2, 100, 8)
    with torch.no_grad():
        assert takes_blocks(q, k, v)  # as given; each case changes one thing
    context = contextlib.nullcontext()
    if case == "one block":
        q, k, v = qkv(1, 2, 64, 8)
    elif case == "bf16":
        q, k, v = qkv(1, 2, 100, 8, dtype=torch.bfloat16)  # attended in fp32, by blocks, after the cast
    elif case == "a past":
        k, v = torch.cat([k, k], 2), torch.cat([v, v], 2)
    elif case == "autograd":
        q.requires_grad_()
    elif case == "scores over the bound":
        monkeypatch.setattr(cpu_attention, "_MAX_SCORES", 2 * 64 * 100 * 4 - 1)  # a byte short of this block's
    elif case == "compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    elif case == "autocast":
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    elif case == "not an AMD CPU":
        monkeypatch.setattr(cpu_attention, "_ON", False)
    else:
        monkeypatch.setattr(cpu_attention, "_MAX_THREADS", 2)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    with context:
        assert not takes_blocks(q, k, v)


def test_gradients_flow_through_sdpa():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 100, 8))
    assert FLASH in kernels(causal_attention, q, k, v)
    causal_attention(q, k, v).square().sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


@pytest.mark.parametrize("shape", list(SHAPES))
def test_long_prompt_forward_matches_transformers(shape):
    # 150 tokens: two full blocks of 64 and a partial one, in every layer.
    ref, ours = make_pair("OPTForCausalLM", shape, max_position_embeddings=160)
    ids = torch.randint(3, 99, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ran = kernels(ours, ids)
        a, b = ours(ids).logits, ref(ids).logits
    assert FLASH not in ran
    # Relative to the largest logit: 150 tokens through these random layers make the logits' fp32 rounding
    # grow (transformers' own fp32 logits are up to 2e-5 of each logit off its float64 ones).
    scale = b.abs().max()
    assert record("forward, 150 tokens, blockwise attention (of the largest)", a / scale, b / scale) < 1e-5


@pytest.mark.parametrize("padding", ["none", "left"])
def test_long_prompt_with_a_padding_mask_matches_transformers(padding):
    # A mask of ones makes the decoder's mask exactly causal: the blocks run. Padding keeps SDPA.
    ref, ours = make_pair("OPTForCausalLM", "post_ln_proj", max_position_embeddings=160)
    ids = torch.randint(3, 99, (2, 150), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    if padding == "left":
        ids[1, :30], mask[1, :30] = 1, 0
    with torch.inference_mode():
        ran = kernels(lambda: ours(ids, attention_mask=mask))
        a, b = ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    assert (FLASH in ran) == (padding == "left")
    keep, scale = mask.bool(), b.abs().max()
    assert record("forward, 150 tokens, padding mask (of the largest)", a[keep] / scale, b[keep] / scale) < 1e-5


def test_only_a_causal_mask_runs_as_causal():
    T = 100
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert _only_causal(causal.expand(2, 1, T, T), T)
    padded = causal.expand(2, 1, T, T).clone()
    padded[1, ..., :3] = False
    assert not _only_causal(padded, T)
    assert not _only_causal(causal.expand(2, 1, T, T).clone().fill_(True), T)  # bidirectional
    assert not _only_causal(torch.zeros(1, 1, T, T).masked_fill(~causal, float("-inf")), T)  # additive
    q, k, v = qkv(1, 2, T, 8)
    with torch.inference_mode():
        assert record("blockwise causal attention", attention(q, k, v, causal[None, None]), sdpa(q, k, v)) < 1e-5
        full = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # a mask of all True: no causal blocks
        assert torch.allclose(attention(q, k, v, causal[None, None].clone().fill_(True)), full, atol=1e-6)


def test_long_prompt_cache_continues_as_transformers(monkeypatch):
    ref, ours = make_pair("OPTForCausalLM", "pre_ln", max_position_embeddings=160)
    ids = torch.randint(3, 99, (1, 140), generator=torch.Generator().manual_seed(1))
    taken = []
    monkeypatch.setattr(cpu_attention, "_blockwise", lambda *a: taken.append(_blockwise(*a)) or taken[-1])
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    got = ours.generate(ids, **kw)
    layers = ours.config.num_hidden_layers
    assert taken[:layers] == [True] * layers and not any(taken[layers:])  # the prefill's layers; then a past
    assert torch.equal(got, ref.generate(ids, **kw))


def exact_attention(q, k, v, mask=None, is_causal=False) -> torch.Tensor:
    """Attention in float64, the reference the reduced-precision results are held to."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2)
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["prompt", "long prompt", "decoding step", "padding mask"])
def test_half_precision_attention_runs_in_fp32(dtype, case):
    T, S = {"prompt": (40, 40), "long prompt": (150, 150), "decoding step": (1, 300), "padding mask": (20, 30)}[case]
    q, k, v = qkv(2, 3, S, 16, dtype=dtype)
    q = q[..., S - T:, :]  # the last T positions query all S keys (a past when S > T)
    mask = None
    if case == "padding mask":
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T) & torch.tensor([[True] * S, [False] * 4 + [True] * 26])[
            :, None, None, :]  # (B, 1, T, S): causal over a past, and the second row's first 4 keys padding
    is_causal = case in ("prompt", "long prompt")
    with torch.inference_mode():
        got = attention(q, k, v, mask, is_causal)
        upcast = attention(q.float(), k.float(), v.float(), mask, is_causal)
    assert got.dtype == dtype and torch.equal(got, upcast.to(dtype))
    exact = exact_attention(q, k, v, mask, is_causal)
    # within one rounding to the half type of the exact attention of the same (rounded) inputs
    eps = torch.finfo(dtype).eps
    assert ((got.double() - exact).abs() <= eps * exact.abs() + 1e-6).all()


def test_other_cpus_keep_half_precision_sdpa(monkeypatch):
    monkeypatch.setattr(cpu_attention, "_ON", False)
    q, k, v = qkv(1, 2, 30, 8, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(attention(q, k, v, is_causal=True), sdpa(q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_stays_close_to_transformers(dtype):
    # A left-padded prompt (rows that attend to nothing at their pads), then one step over its cache, with the same
    # tokens fed to both: transformers' half-precision logits up to that precision's rounding (of the largest).
    ref, ours = make_pair("OPTForCausalLM", "pre_ln")
    ref.to(dtype), ours.to(dtype)
    ids, mask = batch("left")
    step, step_mask = torch.tensor([[5], [6], [7]]), torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
    logits = []
    with torch.inference_mode():
        for model in (ours, ref):
            prompt = model(ids, attention_mask=mask, use_cache=True)
            nxt = model(step, attention_mask=step_mask, past_key_values=prompt.past_key_values)
            logits.append(torch.cat([prompt.logits[mask.bool()], nxt.logits[:, -1]]).float())  # (kept + 3, V)
    got, want = logits
    assert torch.isfinite(got).all()
    scale = want.abs().max()
    assert record(f"{dtype} logits, attention in fp32 (of the largest)", got / scale, want / scale) < 2e-2


@pytest.mark.parametrize("value, on", [("0", False), ("off", False), ("1", True), (None, True)])
def test_environment_switch(value, on):
    assert cpu_attention._switched_on({} if value is None else {"OPTLITE_CPU_ATTENTION": value}) is on
