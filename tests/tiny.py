"""Tiny random OPT models of several shapes, built in transformers (the reference) and in optlite with the
same weights, for the parity tests."""

from __future__ import annotations

import torch

import optlite

BASE = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, ffn_dim=48, num_attention_heads=4,
            max_position_embeddings=40, dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2,
            eos_token_id=2)

SHAPES = {
    "pre_ln": {},
    "post_ln_proj": dict(do_layer_norm_before=False, word_embed_proj_dim=16),  # the opt-350m layout
    "no_bias_no_affine": dict(enable_bias=False, layer_norm_elementwise_affine=False),
    "no_final_ln": dict(_remove_final_layer_norm=True),
    "gelu": dict(activation_function="gelu"),
}

CLASSES = ["OPTModel", "OPTForCausalLM", "OPTForSequenceClassification", "OPTForQuestionAnswering"]

# Recorded by the parity tests and printed at the end of the run (see conftest.py).
MAX_DIFFS: dict[str, float] = {}


def record(name: str, a: torch.Tensor, b: torch.Tensor, relative: bool = False) -> float:
    """The largest |a - b|, remembered under `name` for the summary. With relative=True it is divided by
    max(|b|, 1), for values such as summed log-probabilities (beam scores near -100), whose fp32 rounding grows
    with their size and with the order in which a CPU's BLAS kernel sums: a Xeon and an EPYC differ there."""
    if not a.numel():
        return 0.0
    a, b = a.detach().float(), b.detach().float()
    diff = (a - b).abs()
    if relative:
        diff = diff / b.abs().clamp(min=1.0)
        name += " (relative)"
    MAX_DIFFS[name] = max(MAX_DIFFS.get(name, 0.0), diff.max().item())
    return diff.max().item()


def config_kwargs(shape: str, **overrides) -> dict:
    return {**BASE, **SHAPES[shape], **overrides}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights of a realistic scale: init_std=0.02 leaves activations so small that bugs hide in them."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "layer_norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(0.3 * noise if p.dim() > 1 else 0.1 * noise)


def make_pair(cls_name: str, shape: str, seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """(reference, ours) in eval mode with identical weights; the reference built by transformers."""
    import transformers

    kwargs = config_kwargs(shape, **overrides)
    ref = getattr(transformers, cls_name)(transformers.OPTConfig(**kwargs, attn_implementation=attn_implementation))
    randomize_(ref, seed)
    ours = getattr(optlite, cls_name)(optlite.OPTConfig(**kwargs))
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def batch(padding: str, vocab: int = 99, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of 3 rows of 7 tokens; padding is "none", "right" or "left" (pad id 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    if padding != "none":
        for row, n_pad in enumerate([0, 2, 4]):
            if n_pad:
                sl = slice(0, n_pad) if padding == "left" else slice(7 - n_pad, 7)
                ids[row, sl] = 1
                mask[row, sl] = 0
    return ids, mask
