"""The int8 CPU mode: every projection's weight in int8, one scale per output row, and each product's input
quantized on the fly (one scale per call), run by the fbgemm int8 kernels in PyTorch's x86 builds.

It is the scheme CTranslate2's int8 uses, opt-in and inference only. The token embedding table is int8 too (one
scale per row, looked up into fp32); LayerNorms, attention, the position table and the residual stream stay fp32.
Turned on with one argument:

    model = OPTForCausalLM.from_pretrained(path, quantize="int8")

which reads the checkpoint as bfloat16 and quantizes layer by layer, so no fp32 copy of the model is ever held.

Inputs are quantized to 8 bits on CPUs with AVX512-VNNI, whose int8 products accumulate in int32, and to 7 bits
elsewhere: without VNNI, fbgemm adds pairs of u8 x s8 products in int16, which 8-bit inputs can overflow. Chosen at
run time; 8 bits halves the error of each product.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8",)
QKV = ("q_proj", "k_proj", "v_proj")  # attention's projections of one input, quantized as one product


def full_range_inputs() -> bool:
    """Whether this CPU takes 8-bit quantized inputs safely (AVX512-VNNI: int32 accumulation), else 7-bit.

    Example:
        >>> isinstance(full_range_inputs(), bool)
        True
    """
    return bool(torch.cpu._is_vnni_supported())


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per row of `w`: (q, scales) with w ~ q * scales[:, None]."""
    scales = (w.abs().amax(dim=1).float() / 127).clamp_min(1e-12)
    q = torch.empty(w.shape, dtype=torch.int8)
    for i in range(0, w.shape[0], 256):  # 256 rows at a time: the fp32 temporaries stay small
        q[i:i + 256] = (w[i:i + 256].float() / scales[i:i + 256, None]).round_().clamp_(-127, 127)
    return q, scales


def _pack(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fbgemm's packed int8 weight (symmetric, per output row) with the fp32 bias, from a float weight on the CPU."""
    if weight.device.type != "cpu":
        raise ValueError(f"int8 mode runs on the CPU only; this layer is on {weight.device}")
    q, scales = quantize_rows(weight.detach())
    bias = None if bias is None else bias.detach().float()
    with warnings.catch_warnings():  # torch flags its quantized-tensor constructors as deprecated; fbgemm needs one
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros_like(scales).long(), 0)
        return torch.ops.quantized.linear_prepack(qweight, bias)


def _float32(x: torch.Tensor) -> torch.Tensor:
    """`x` itself, after checking it is float32: fbgemm's kernels would fail deep inside on any other dtype."""
    if x.dtype != torch.float32:
        raise TypeError(f"Int8Linear takes float32 input, got {x.dtype}")
    return x


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight (per-output-row scales) and fp32 input, output and bias.

    Not an `nn.Linear` (code that finds projections with `type(m) is nn.Linear` skips it); forward hooks fire as on
    any module. `weight` and `bias` give the dequantized fp32 weight and the bias, for inspection.

    Example:
        >>> layer = Int8Linear.from_linear(nn.Linear(64, 32))
        >>> layer(torch.randn(3, 64)).shape
        torch.Size([3, 32])
    """

    def __init__(self, packed: torch.Tensor, in_features: int, out_features: int, reduce_range: bool | None = None,
                 rows: tuple[int, int, int] | None = None):
        super().__init__()
        self.packed = packed  # fbgemm's prepacked int8 weight and fp32 bias (a torch.ScriptObject)
        self.in_features, self.out_features = in_features, out_features
        # True: 7-bit inputs, so fbgemm's int16 sums of pairs of products cannot overflow (CPUs without VNNI).
        self.reduce_range = not full_range_inputs() if reduce_range is None else reduce_range
        # (start, stop, outputs of the product): this layer's rows of a product it shares (`stack_int8`), or None
        self.rows = rows

    @classmethod
    def from_linear(cls, linear: nn.Linear, reduce_range: bool | None = None) -> Int8Linear:
        """Quantize `linear` (any float dtype, on the CPU): symmetric int8 per output row. `reduce_range`: quantize
        the inputs to 7 bits instead of 8; None chooses from the CPU (8 bits with AVX512-VNNI)."""
        return cls(_pack(linear.weight, linear.bias), linear.in_features, linear.out_features, reduce_range)

    def _own_rows(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """This layer's part (along `dim`) of the weight, bias or output of the product it may share."""
        return t if self.rows is None else t.narrow(dim, self.rows[0], self.rows[1] - self.rows[0]).contiguous()

    @property
    def weight(self) -> torch.Tensor:
        return self._own_rows(torch.ops.quantized.linear_unpack(self.packed)[0].dequantize(), dim=0)

    @property
    def bias(self) -> torch.Tensor | None:
        bias = torch.ops.quantized.linear_unpack(self.packed)[1]
        return None if bias is None else self._own_rows(bias)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # state_dict() and save_pretrained() see a plain linear layer holding the dequantized weight.
        destination[prefix + "weight"] = self.weight
        bias = self.bias
        if bias is not None:
            destination[prefix + "bias"] = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A layer sharing a product computes all of it and keeps its rows: only when called alone (hooked).
        return self._own_rows(torch.ops.quantized.linear_dynamic(_float32(x), self.packed, self.reduce_range))

    def forward_relu(self, x: torch.Tensor) -> torch.Tensor:
        """`F.relu(self(x))` in one fbgemm kernel: the ReLU runs on the output tiles, not as a pass of its own
        (fc1's output is the largest activation of a layer). `cpu_linear.project` calls it for a layer without
        hooks, which would see the output before the ReLU."""
        return self._own_rows(torch.ops.quantized.linear_relu_dynamic(_float32(x), self.packed, self.reduce_range))

    @staticmethod
    def forward_stacked(layers: list[Int8Linear], x: torch.Tensor) -> list[torch.Tensor] | None:
        """`[layer(x) for layer in layers]` as one product, when the layers are the rows of one shared product
        (`stack_int8`), in order; None otherwise. The outputs are views of that product's output, as
        `cpu_linear.project_stacked` gives them in fp32. The same numbers as separate products: the weight rows
        are quantized alone, and one input gets one input scale."""
        first, start = layers[0], 0
        for layer in layers:
            if (type(layer) is not Int8Linear or layer.packed is not first.packed or layer.rows is None
                    or layer.rows[0] != start or layer.reduce_range != first.reduce_range):
                return None
            start = layer.rows[1]
        if start != first.rows[2]:
            return None
        y = torch.ops.quantized.linear_dynamic(_float32(x), first.packed, first.reduce_range)
        return list(y.split([layer.out_features for layer in layers], dim=-1))

    def nbytes(self) -> int:
        """Bytes fbgemm holds for this layer's product (shared by the layers of a stacked one): the int8 weight
        twice (its packed layout and the plain one), the per-row scales and zero points (float64 and int64, as
        torch's quantized tensors keep them) and the bias."""
        weight, bias = torch.ops.quantized.linear_unpack(self.packed)
        rows = weight.shape[0]
        return 2 * weight.numel() + 16 * rows + (0 if bias is None else bias.numel() * bias.element_size())

    def extra_repr(self) -> str:
        bits = 7 if self.reduce_range else 8
        shared = "" if self.rows is None else f", rows {self.rows[0]}:{self.rows[1]} of a shared product"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, {bits}-bit inputs{shared}"


class Int8Embedding(nn.Module):
    """A token embedding table in int8 with one fp32 scale per row; a lookup gives fp32 rows.

    `weight` and `state_dict()` give the dequantized table, under the key an `nn.Embedding` has.

    Example:
        >>> table = Int8Embedding.from_embedding(nn.Embedding(100, 16, padding_idx=1))
        >>> table(torch.tensor([[2, 5, 7]])).shape, table.table.dtype
        (torch.Size([1, 3, 16]), torch.int8)
    """

    def __init__(self, table: torch.Tensor, scales: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        self.register_buffer("table", table)  # (V, P) int8
        self.register_buffer("scales", scales)  # (V, 1) fp32
        self.num_embeddings, self.embedding_dim = table.shape
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        """Quantize `embedding` (any float dtype): symmetric int8 per row."""
        q, scales = quantize_rows(embedding.weight.detach())
        return cls(q, scales[:, None], embedding.padding_idx)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.float() * self.scales

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight  # an nn.Embedding's key and float values

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.table).float() * F.embedding(input_ids, self.scales)  # (..., P)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, int8"


def stack_int8(linears: Sequence[nn.Linear], reduce_range: bool | None = None) -> list[Int8Linear]:
    """Quantize `linears`, projections of one input, as one int8 product: an `Int8Linear` each, all sharing one
    packed weight, each owning its rows. `cpu_linear.project_stacked` runs them as one call, which saves decoding
    two calls and two input quantizations a layer: opt-125m decoded batch 1 8% faster and batch 8 4% (AVX2 EPYC,
    2 threads); at 512 rows one 2304-wide product and three 768-wide ones ran at the same rate.

    Example:
        >>> q, k, v = stack_int8([nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)])
        >>> q.packed is v.packed, v.rows, v.weight.shape
        (True, (16, 24, 24), torch.Size([8, 16]))
    """
    biases = [layer.bias for layer in linears]
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    packed = _pack(torch.cat([layer.weight.detach() for layer in linears]), bias)
    ends = list(accumulate(layer.out_features for layer in linears))
    return [Int8Linear(packed, layer.in_features, layer.out_features, reduce_range, (end - layer.out_features, end,
                                                                                      ends[-1]))
            for layer, end in zip(linears, ends, strict=True)]


def _stackable(linears: Sequence[nn.Module]) -> bool:
    """nn.Linear layers of one input size, dtype and device, all with a bias or all without."""
    first = linears[0]
    return all(isinstance(m, nn.Linear) and m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
               and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None)
               for m in linears)


def check_mode(mode: str, device: object, device_map: object, dtype: object = None) -> None:
    """Refuse what the int8 mode cannot do before anything is read."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: expected one of {', '.join(map(repr, MODES))}")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"quantize={mode!r} needs PyTorch's fbgemm kernels (x86 builds); this build has "
                           f"{torch.backends.quantized.supported_engines}")
    if device_map is not None or (device is not None and torch.device(device).type != "cpu"):
        raise ValueError(f"quantize={mode!r} runs on the CPU: leave device/device_map unset "
                         f"(got device={device!r}, device_map={device_map!r})")
    if dtype is not None and dtype not in ("float32", torch.float32):
        raise ValueError(f"quantize={mode!r} sets the dtypes itself (int8 projections, fp32 elsewhere): leave dtype "
                         f"unset (got dtype={dtype!r})")


def quantize_(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of `model` by an `Int8Linear`, one at a time (attention's q/k/v as one shared
    product, `stack_int8`), and the token embedding table by an `Int8Embedding`, then make the rest fp32; in place.

    A tied lm_head gets its own int8 copy (fbgemm's packed layout), and the lookups read the int8 table: 3 bytes a
    vocabulary weight instead of the 6 of an fp32 table next to an int8 head.

    Example:
        >>> from optlite import OPTConfig, OPTForCausalLM
        >>> model = quantize_(OPTForCausalLM(OPTConfig.from_preset("opt-tiny")).eval())
        >>> type(model.lm_head).__name__, type(model.get_input_embeddings()).__name__
        ('Int8Linear', 'Int8Embedding')
    """
    if torch.backends.quantized.engine != "fbgemm" and "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"
    for attention in [m for m in model.modules() if all(hasattr(m, n) for n in QKV)]:
        if _stackable([getattr(attention, n) for n in QKV]):  # one product, one input quantization
            for name, layer in zip(QKV, stack_int8([getattr(attention, n) for n in QKV]), strict=True):
                setattr(attention, name, layer)
    # (parent, name) pairs, not the layers: a list holding the old layers would keep all their weights alive.
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for parent, name in targets:
        setattr(parent, name, Int8Linear.from_linear(getattr(parent, name)))
    if hasattr(model, "get_input_embeddings"):
        model.set_input_embeddings(Int8Embedding.from_embedding(model.get_input_embeddings()))
    return model.float().eval()  # the position table and LayerNorms: bf16 when loaded for this mode


def model_nbytes(model: nn.Module) -> int:
    """Bytes the model's weights take: its parameters and buffers (an `Int8Embedding`'s int8 table among them)
    plus every `Int8Linear`'s fbgemm storage.

    Example:
        >>> from optlite import OPTConfig, OPTForCausalLM
        >>> model = OPTForCausalLM(OPTConfig.from_preset("opt-tiny"))
        >>> fp32 = model_nbytes(model)
        >>> model_nbytes(quantize_(model)) < fp32
        True
    """
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    products = {id(m.packed): m.nbytes() for m in model.modules() if isinstance(m, Int8Linear)}  # shared: once
    return sum(tensors.values()) + sum(products.values())
