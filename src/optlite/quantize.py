"""The int8 CPU mode: every projection's weight in int8, one scale per output row, and each product's input
quantized on the fly (one scale per call), run by the fbgemm int8 kernels in PyTorch's x86 builds.

It is the scheme CTranslate2's int8 uses, opt-in and inference only. LayerNorms, attention, the embeddings and the
residual stream stay fp32. Turned on with one argument:

    model = OPTForCausalLM.from_pretrained(path, quantize="int8")

which reads the checkpoint as bfloat16 and quantizes layer by layer, so no fp32 copy of the model is ever held.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

MODES = ("int8",)


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight (per-output-row scales) and fp32 input, output and bias.

    Not an `nn.Linear` (code that finds projections with `type(m) is nn.Linear` skips it); forward hooks fire as on
    any module. `weight` gives the dequantized fp32 weight, for inspection.

    Example:
        >>> layer = Int8Linear.from_linear(nn.Linear(64, 32))
        >>> layer(torch.randn(3, 64)).shape
        torch.Size([3, 32])
    """

    def __init__(self, packed: torch.Tensor, in_features: int, out_features: int):
        super().__init__()
        self.packed = packed  # fbgemm's prepacked int8 weight and fp32 bias (a torch.ScriptObject)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize `linear` (any float dtype, on the CPU): symmetric int8 per output row."""
        if linear.weight.device.type != "cpu":
            raise ValueError(f"int8 mode runs on the CPU only; this layer is on {linear.weight.device}")
        w = linear.weight.detach()
        scales = (w.abs().amax(dim=1).float() / 127).clamp_min(1e-12)
        q = torch.empty(w.shape, dtype=torch.int8)
        for i in range(0, w.shape[0], 256):  # 256 rows at a time: the fp32 temporaries stay small
            q[i:i + 256] = (w[i:i + 256].float() / scales[i:i + 256, None]).round_().clamp_(-127, 127)
        bias = None if linear.bias is None else linear.bias.detach().float()
        with warnings.catch_warnings():  # torch flags its quantized-tensor constructors as deprecated; fbgemm needs one
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros_like(scales).long(), 0)
            packed = torch.ops.quantized.linear_prepack(qweight, bias)
        return cls(packed, linear.in_features, linear.out_features)

    @property
    def weight(self) -> torch.Tensor:
        return torch.ops.quantized.linear_unpack(self.packed)[0].dequantize()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # state_dict() and save_pretrained() see a plain linear layer holding the dequantized weight.
        weight, bias = torch.ops.quantized.linear_unpack(self.packed)
        destination[prefix + "weight"] = weight.dequantize()
        if bias is not None:
            destination[prefix + "bias"] = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"Int8Linear takes float32 input, got {x.dtype}")
        # reduce_range: 7-bit inputs, so fbgemm's int16 accumulation of pairs of products never overflows (AVX2).
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def check_mode(mode: str, device: object, device_map: object) -> None:
    """Refuse what the int8 mode cannot do before anything is read."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: expected one of {', '.join(map(repr, MODES))}")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"quantize={mode!r} needs PyTorch's fbgemm kernels (x86 builds); this build has "
                           f"{torch.backends.quantized.supported_engines}")
    if device_map is not None or (device is not None and torch.device(device).type != "cpu"):
        raise ValueError(f"quantize={mode!r} runs on the CPU: leave device/device_map unset "
                         f"(got device={device!r}, device_map={device_map!r})")


def quantize_(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of `model` by an `Int8Linear`, one at a time, then make the rest fp32; in place.

    A tied lm_head gets its own int8 copy: the embedding table stays float for the lookups.

    Example:
        >>> from optlite import OPTConfig, OPTForCausalLM
        >>> model = quantize_(OPTForCausalLM(OPTConfig.from_preset("opt-tiny")).eval())
        >>> type(model.lm_head).__name__
        'Int8Linear'
    """
    if torch.backends.quantized.engine != "fbgemm" and "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"
    # (parent, name) pairs, not the layers: a list holding the old layers would keep all their weights alive.
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for parent, name in targets:
        setattr(parent, name, Int8Linear.from_linear(getattr(parent, name)))
    return model.float().eval()  # the embeddings and LayerNorms: bf16 when loaded for this mode
