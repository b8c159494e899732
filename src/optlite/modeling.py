"""The OPT decoder in data-flow order: positions, masks, attention, decoder layer, decoder stack, OPTModel.

Shapes: B batch, T new tokens, S keys (cached + new), C hidden_size, P word_embed_proj_dim, H heads, D head_dim.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .activations import ACTIVATIONS
from .cache import Cache, DynamicCache, as_cache
from .config import OPTConfig
from .cpu_attention import attention
from .cpu_linear import project, project_stacked, share_storage
from .cpu_memory import tune_malloc_for_training_once, tune_malloc_once
from .outputs import BaseModelOutputWithPast

logger = logging.getLogger(__name__)


class OPTLearnedPositionalEmbedding(nn.Embedding):
    """Learned positions. OPT keeps fairseq's offset: position p is row p + 2 of a (max_positions + 2)-row table."""

    offset = 2

    def __init__(self, num_positions: int, embedding_dim: int):
        super().__init__(num_positions + self.offset, embedding_dim)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(position_ids + self.offset)


def config_flag(config: OPTConfig, name: str, value: bool | None) -> bool:
    """An argument given to forward wins; None falls back to the config's flag of that name, as in transformers
    (`output_attentions`, `output_hidden_states` default False; `use_return_dict` True)."""
    if value is not None:
        return bool(value)
    if name == "use_return_dict":
        return bool(getattr(config, "use_return_dict", getattr(config, "return_dict", True)))
    return bool(getattr(config, name, False))


def position_ids_from_mask(attention_mask: torch.Tensor | None, past_len: int, q_len: int,
                           device: torch.device) -> torch.Tensor:
    """Positions count only attended tokens, so a left-padded row starts at 0 after its pads (pads get -1)."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device).unsqueeze(0)  # (1, T)
    mask = attention_mask.long()
    return (mask.cumsum(-1) * mask - 1)[:, past_len:]  # (B, T)


def causal_mask(q_len: int, past_len: int, device: torch.device) -> torch.Tensor:
    """True where a query may attend: each of the q_len new tokens sees the past_len cached ones and itself."""
    q_pos = torch.arange(past_len, past_len + q_len, device=device)
    k_pos = torch.arange(past_len + q_len, device=device)
    return (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean keep-mask as the additive float mask eager attention adds to its scores (a float mask as is)."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def build_attention_mask(attention_mask: torch.Tensor | None, q_len: int, past_len: int, dtype: torch.dtype,
                         device: torch.device, need_weights: bool) -> torch.Tensor | None:
    """The mask the decoder passes to its layers: None when SDPA's own causal flag suffices (no padding mask, and
    a single new token or an empty cache), else a boolean (B, 1, T, S) mask for SDPA, or an additive float mask
    for the eager path. Masked scores get finfo(dtype).min, never -inf, so a fully masked row (a left pad) gives
    no NaN. A given mask is always applied, even when it is all ones: deciding that would branch on data."""
    if attention_mask is None and not need_weights and (q_len == 1 or past_len == 0):
        return None
    allowed = causal_mask(q_len, past_len, device)  # (1, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    return additive_mask(allowed, dtype) if need_weights else allowed


class OPTAttention(nn.Module):
    """Multi-head self-attention with OPT's pre-scaled query."""

    def __init__(self, config: OPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        c, bias = config.hidden_size, config.enable_bias
        self.k_proj = nn.Linear(c, c, bias=bias)
        self.v_proj = nn.Linear(c, c, bias=bias)
        self.q_proj = nn.Linear(c, c, bias=bias)
        self.out_proj = nn.Linear(c, c, bias=bias)
        self.share_qkv_storage()

    def share_qkv_storage(self) -> None:
        """Keep q/k/v's weights and biases as views of one buffer (same Parameters, same state_dict), so that the
        CPU's fp32 path reads them as one matrix (`cpu_linear.project_stacked`): one product instead of three."""
        share_storage([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, hidden_states: torch.Tensor, past_key_values: Cache | None = None,
                attention_mask: torch.Tensor | None = None, output_attentions: bool = False,
                layer_head_mask: torch.Tensor | None = None, **kwargs: Any,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attention_mask`: the (B, 1, T, S) mask the decoder passes (boolean keep-mask or additive float), or
        None for causal attention. Returns the output and, with `output_attentions`, the attention weights."""
        B, T, C = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = project_stacked([self.q_proj, self.k_proj, self.v_proj], hidden_states)  # (B, T, C) each
        # OPT scales the query (bias included) right after q_proj; the scores are then left unscaled (scale=1).
        q = (q * self.scaling).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        past = 0
        if past_key_values is not None:
            past = past_key_values.get_seq_length(self.layer_idx)
            k, v = past_key_values.update(k, v, self.layer_idx)  # (B, H, S, D)
        mask = attention_mask
        need_weights = output_attentions or layer_head_mask is not None  # SDPA gives no weights, takes no head mask
        # SDPA's is_causal aligns queries to the first key, which is right only without a past.
        if mask is None and (need_weights or (past and T > 1)):
            mask = causal_mask(T, past, hidden_states.device)  # (1, 1, T, S)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-1, -2) + additive_mask(mask, q.dtype)  # (B, H, T, S)
            weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # softmax in fp32, as OPT does
            if layer_head_mask is not None:
                weights = weights * layer_head_mask.view(1, -1, 1, 1)
            out = F.dropout(weights, p=p, training=self.training) @ v  # (B, H, T, D)
        else:
            weights = None
            # A Python bool decided by the cache's structure, so tracing with a dynamic length never sees a SymBool.
            is_causal = mask is None and not past
            out = attention(q, k, v, mask, is_causal, dropout_p=p)  # SDPA, or its faster CPU forms (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return project(self.out_proj, out), weights if output_attentions else None


class OPTDecoderLayer(nn.Module):
    """Attention then feed-forward, each with a residual. Pre-LN for every size except 350m, which is post-LN."""

    def __init__(self, config: OPTConfig, layer_idx: int):
        super().__init__()
        self.self_attn = OPTAttention(config, layer_idx)
        self.do_layer_norm_before = config.do_layer_norm_before
        self.dropout = config.dropout
        self.act = ACTIVATIONS[config.activation_function]
        affine, c = config.layer_norm_elementwise_affine, config.hidden_size
        self.self_attn_layer_norm = nn.LayerNorm(c, elementwise_affine=affine)
        self.fc1 = nn.Linear(c, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, c, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(c, elementwise_affine=affine)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool = False,
                position_ids: torch.Tensor | None = None, output_attentions: bool = False,
                layer_head_mask: torch.Tensor | None = None, **kwargs: Any,
                ) -> tuple[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
        """Returns `(hidden_states,)`, or `(hidden_states, attention_weights)` with `output_attentions`.
        Called alone, `attention_mask=None` means causal attention over `hidden_states` (and the cache's past).

        Example:
            >>> import torch
            >>> from optlite import OPTConfig, OPTModel
            >>> layer = OPTModel(OPTConfig.from_preset("opt-tiny")).decoder.layers[0]
            >>> layer(torch.randn(1, 5, 64))[0].shape
            torch.Size([1, 5, 64])
        """
        h, pre = hidden_states, self.do_layer_norm_before
        a, weights = self.self_attn(self.self_attn_layer_norm(h) if pre else h, past_key_values=past_key_values,
                                    attention_mask=attention_mask, output_attentions=output_attentions,
                                    layer_head_mask=layer_head_mask)
        h = h + (F.dropout(a, p=self.dropout, training=True) if self.training else a)
        if not pre:
            h = self.self_attn_layer_norm(h)  # 350m: LayerNorm after the residual
        x = self.final_layer_norm(h) if pre else h
        # ReLU (every OPT checkpoint's) and, outside training, the residual run inside the products on the CPU.
        f = project(self.fc1, x, relu=True) if self.act is F.relu else self.act(project(self.fc1, x))
        if self.training:
            h = h + F.dropout(project(self.fc2, f), p=self.dropout, training=True)
        else:
            h = project(self.fc2, f, residual=h)
        if not pre:
            h = self.final_layer_norm(h)
        return (h, weights) if output_attentions else (h,)


class OPTPreTrainedModel(nn.Module):
    """What every OPT class shares: weight init, embeddings access, gradient checkpointing, loading and saving,
    and the attributes and methods of transformers' `PreTrainedModel` that PEFT, Trainer, TRL, lm-eval, pipelines
    and accelerate use (`base_model`, `can_generate`, `generation_config`, `enable_input_require_grads`, ...).

    Example:
        >>> from optlite import OPTConfig, OPTForCausalLM
        >>> model = OPTForCausalLM(OPTConfig.from_preset("opt-tiny"))
        >>> model.can_generate(), model.base_model is model.model, model.generation_config.eos_token_id
        (True, True, 2)
    """

    config_class = OPTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OPTDecoderLayer"]  # accelerate's device_map never splits a layer
    _tied_weights_keys: dict[str, str] | None = None  # {tied key: the key it shares its tensor with}
    _keys_to_ignore_on_save: list[str] | None = None  # none: every state_dict key is saved, as in transformers

    def __init__(self, config: OPTConfig):
        super().__init__()
        if not isinstance(config, OPTConfig):
            raise TypeError(f"{type(self).__name__} needs an OPTConfig, got {type(config).__name__}")
        self.config = config
        self.name_or_path = config.name_or_path
        self.model_tags: list[str] | None = None
        self.generation_config = None
        if self.can_generate():
            from .generation import GenerationConfig

            self.generation_config = GenerationConfig.from_model_config(config)
        self.register_state_dict_post_hook(_untie_saved_keys)
        self.register_load_state_dict_pre_hook(_fill_tied_keys)

    @property
    def decoder_stack(self) -> OPTDecoder:
        return self.decoder if isinstance(self, OPTModel) else self.model.decoder

    @property
    def base_model(self) -> nn.Module:
        """The bare OPTModel inside a head class (the model itself for OPTModel), as in transformers."""
        return getattr(self, self.base_model_prefix, self)

    def get_decoder(self) -> OPTDecoder:
        return self.decoder_stack

    @classmethod
    def can_generate(cls) -> bool:
        """Whether `generate()` exists: True for OPTForCausalLM only."""
        return False

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Remember tags for a model card (TRL adds its own); existing tags are kept, none is repeated."""
        self.model_tags = self.model_tags or []
        for tag in [tags] if isinstance(tags, str) else tags:
            if tag not in self.model_tags:
                self.model_tags.append(tag)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first weight's device, or, when accelerate offloaded it (meta), the device its hooks
        run the layers on, so generate() never puts inputs or a cache on meta."""
        first = next(self.parameters())
        if not first.is_meta:
            return first.device
        for module in self.modules():
            device = _execution_device(getattr(module, "_hf_hook", None))
            if device is not None:
                return device
        return first.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---------------------------------------------------------------------------------------------------------- weights

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def post_init(self) -> None:
        """Initialise every weight as transformers does, then tie the output embedding to the input one."""
        self.apply(self._init_weights)
        self.tie_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder_stack.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.decoder_stack.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear | None:
        return None

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad, so gradients reach adapters (LoRA on a frozen model)
        through gradient checkpointing. Undone by `disable_input_require_grads`."""
        self.disable_input_require_grads()
        hook = lambda module, args, output: output.requires_grad_(True)  # noqa: E731
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(hook)

    def disable_input_require_grads(self) -> None:
        hook = self.__dict__.pop("_require_grads_hook", None)
        if hook is not None:
            hook.remove()

    def tie_weights(self) -> None:
        """Share the input embedding matrix with the LM head when the config ties them (all OPT checkpoints do)."""
        head = self.get_output_embeddings()
        if head is not None and self.config.tie_word_embeddings:
            head.weight = self.get_input_embeddings().weight

    def resize_token_embeddings(self, new_num_tokens: int | None = None,
                                pad_to_multiple_of: int | None = None) -> nn.Embedding:
        """Grow or shrink the vocabulary. Kept rows are unchanged; new rows start at the mean of the old ones
        (as transformers' default mean-resizing does in expectation), so new tokens start with average logits.

        Example:
            >>> from optlite import OPTConfig, OPTForCausalLM
            >>> model = OPTForCausalLM(OPTConfig.from_preset("opt-tiny"))
            >>> model.resize_token_embeddings(50300).weight.shape, model.lm_head.weight.shape
            (torch.Size([50300, 64]), torch.Size([50300, 64]))
        """
        old = self.get_input_embeddings()
        n = new_num_tokens if new_num_tokens is not None else old.num_embeddings
        if pad_to_multiple_of is not None:
            n = math.ceil(n / pad_to_multiple_of) * pad_to_multiple_of
        if n < 1:
            raise ValueError(f"new_num_tokens must be positive, got {n}")
        if old.padding_idx is not None and old.padding_idx >= n:
            raise ValueError(f"new_num_tokens={n} would drop the padding row {old.padding_idx}")
        self.set_input_embeddings(_resized_rows(old, n))
        self.config.vocab_size = n
        head = self.get_output_embeddings()
        if head is not None:
            if self.config.tie_word_embeddings:
                self.tie_weights()
            else:
                new_head = nn.Linear(head.in_features, n, bias=False, device=head.weight.device,
                                  dtype=head.weight.dtype)
                new_head.weight = _resized_rows(head, n).weight
                self.lm_head = new_head
        return self.get_input_embeddings()

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights counted once (opt-125m: 125,239,296)."""
        skip = set()
        if exclude_embeddings:
            skip = {id(self.get_input_embeddings().weight), id(self.decoder_stack.embed_positions.weight)}
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    # ------------------------------------------------------------------------------------------- gradient checkpointing

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute each decoder layer in the backward pass instead of storing its activations.
        `gradient_checkpointing_kwargs` go to `torch.utils.checkpoint.checkpoint` (default `use_reentrant=False`);
        the other two are transformers 5's arguments, accepted at their defaults (every layer, no offload). As in
        transformers, it also calls `enable_input_require_grads()`: a reentrant checkpoint of a frozen model with
        adapters (LoRA) would otherwise see inputs without grad and give the adapters none.

        Example:
            >>> from optlite import OPTConfig, OPTForCausalLM
            >>> model = OPTForCausalLM(OPTConfig.from_preset("opt-tiny"))
            >>> model.gradient_checkpointing_enable({"use_reentrant": False})
            >>> model.is_gradient_checkpointing
            True
        """
        if every_n_layers != 1 or offload:
            raise NotImplementedError(f"gradient checkpointing checkpoints every layer, on the layers' device; got "
                                      f"every_n_layers={every_n_layers!r}, offload={offload!r} (use 1 and False)")
        self.decoder_stack.gradient_checkpointing = True
        self.decoder_stack.checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.enable_input_require_grads()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers 5's name for `gradient_checkpointing_enable` (what Trainer calls)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        self.decoder_stack.gradient_checkpointing = False

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.decoder_stack.gradient_checkpointing

    is_activation_checkpointing = is_gradient_checkpointing

    # -------------------------------------------------- loading and saving (the work is in checkpoint.py and saving.py)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, dtype: str | torch.dtype | None = None,
                        torch_dtype: str | torch.dtype | None = None, device: str | int | torch.device | None = None,
                        device_map: str | dict | int | torch.device | None = None, max_memory: dict | None = None,
                        offload_folder: str | os.PathLike | None = None, ignore_mismatched_sizes: bool = False,
                        output_loading_info: bool = False, config: OPTConfig | None = None, progress: bool = True,
                        subfolder: str = "", state_dict: dict[str, torch.Tensor] | None = None,
                        quantize: str | None = None, **config_overrides: Any) -> Any:
        """Load a checkpoint from a local directory or a hub repo id (safetensors preferred, else `.bin` through
        `torch.load(weights_only=True)`), in any of the hub's key layouts, built on the meta device and filled
        without copies when the dtype does not change.

        `dtype`: None (float32), "auto" (the checkpoint's), "float16", "bfloat16", "float32" or a torch.dtype
        (`torch_dtype` is an alias). `device`: "cpu", "cuda", "cuda:1", "mps"… `device_map`: "auto", "balanced",
        "sequential" or a {module: device | "disk"} dict, with `max_memory` and `offload_folder` (accelerate).
        `quantize="int8"`: the opt-in int8 CPU mode of `optlite.quantize` (int8 projections, inference only).
        Other keyword arguments override config values (`num_labels=3`, `dropout=0.0`). A head missing from the
        checkpoint is initialised and reported; `output_loading_info=True` returns `(model, info)` with
        transformers' sets of missing / unexpected / mismatched keys. `subfolder`: the checkpoint sits in that
        folder of the directory or repo. `state_dict`: weights to use instead of the checkpoint's files; with
        `name_or_path=None` and `config=` no files are read at all. Preset names ("opt-125m") are not
        checkpoints: use `Class(OPTConfig.from_preset(name))` for a random model.

        Example:
            >>> from optlite import OPTForCausalLM
            >>> model = OPTForCausalLM.from_pretrained("facebook/opt-125m", dtype="auto")
            >>> model.dtype
            torch.float16
        """
        from .checkpoint import load_pretrained
        from .hub import Source

        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ValueError(f"dtype={dtype!r} and its alias torch_dtype={torch_dtype!r} disagree")
        source = Source(name_or_path, revision, cache_dir, local_files_only, token, subfolder)
        if quantize is not None:  # the opt-in int8 CPU mode (quantize.py): read as bf16, quantized layer by layer
            from .quantize import check_mode, quantize_

            check_mode(quantize, device, device_map, dtype if dtype is not None else torch_dtype)
            loaded = load_pretrained(cls, source, dtype=torch.bfloat16, output_loading_info=output_loading_info,
                                     config=config, progress=progress, ignore_mismatched_sizes=ignore_mismatched_sizes,
                                     state_dict=state_dict, **config_overrides)
            quantize_(loaded[0] if output_loading_info else loaded)
            return loaded
        return load_pretrained(cls, source, dtype=dtype if dtype is not None else torch_dtype, device=device,
                               device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                               ignore_mismatched_sizes=ignore_mismatched_sizes, output_loading_info=output_loading_info,
                               config=config, progress=progress, state_dict=state_dict, **config_overrides)

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True) -> None:
        """Write config.json and the weights (safetensors, sharded above `max_shard_size` such as "5GB" or
        "200MB"; `.bin` with `safe_serialization=False`) in transformers' layout, tied lm_head stored once. The save
        is atomic: it is written beside `save_directory` and swapped in, so a failed save leaves the old one intact.

        Example:
            >>> from optlite import OPTConfig, OPTForCausalLM
            >>> from pathlib import Path
            >>> OPTForCausalLM(OPTConfig.from_preset("opt-tiny")).save_pretrained("tiny-ckpt")
            >>> sorted(p.name for p in Path("tiny-ckpt").iterdir())
            ['config.json', 'generation_config.json', 'model.safetensors']
        """
        from .saving import save_pretrained

        save_pretrained(self, save_directory, max_shard_size=max_shard_size, safe_serialization=safe_serialization)


def _execution_device(hook: Any) -> torch.device | None:
    """The device an accelerate hook (or any hook of a SequentialHook) runs its module on, if it names one."""
    for h in getattr(hook, "hooks", [hook]):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def _untie_saved_keys(model: OPTPreTrainedModel, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    """state_dict() has transformers' keys, the tied lm_head.weight as a copy: tools that save a plain module's
    state dict with safetensors (Trainer, for any model not a transformers class) refuse two keys on one tensor.
    With keep_vars=True the parameters themselves are returned, the tied one included."""
    for key, source in (model._tied_weights_keys or {}).items():
        value = state.get(prefix + key)
        if value is not None and not isinstance(value, nn.Parameter) and _is_tied(model, key, source):
            state[prefix + key] = value.clone()


def _fill_tied_keys(model: OPTPreTrainedModel, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict() of a state dict without the tied weight fills it from the weight it is tied to."""
    if model.config.tie_word_embeddings:
        for key, source in (model._tied_weights_keys or {}).items():
            if prefix + key not in state and prefix + source in state:
                state[prefix + key] = state[prefix + source]


def _is_tied(model: nn.Module, key: str, source: str) -> bool:
    try:
        return model.get_parameter(key) is model.get_parameter(source)
    except AttributeError:  # a head replaced by something without that weight
        return False


def _resized_rows(old: nn.Embedding | nn.Linear, n: int) -> nn.Embedding:
    weight = old.weight
    new = nn.Embedding(n, weight.shape[1], padding_idx=getattr(old, "padding_idx", None), device=weight.device,
                       dtype=weight.dtype)
    copied = min(n, weight.shape[0])
    with torch.no_grad():
        new.weight[:copied] = weight[:copied]
        if n > copied:
            new.weight[copied:] = weight.float().mean(0).to(weight.dtype)
    return new


class OPTDecoder(nn.Module):
    """Embeddings, the stack of decoder layers, and the final LayerNorm / projection."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.layerdrop = config.layerdrop
        self.gradient_checkpointing = False
        self.checkpoint_kwargs: dict[str, Any] = {"use_reentrant": False}
        c, p = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, p, config.pad_token_id)
        self.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings, c)
        # 350m embeds words in 512 dims and projects to and from the 1024-wide stack.
        self.project_out = nn.Linear(c, p, bias=False) if p != c else None
        self.project_in = nn.Linear(p, c, bias=False) if p != c else None
        affine = config.layer_norm_elementwise_affine
        self.final_layer_norm = nn.LayerNorm(c, elementwise_affine=affine) if config.has_final_layer_norm else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        cfg = self.config
        if not torch.compiler.is_compiling():  # a ctypes call: not something to trace
            tune_malloc_for_training_once() if self.training and torch.is_grad_enabled() else tune_malloc_once()
        output_attentions = config_flag(cfg, "output_attentions", output_attentions)
        output_hidden_states = config_flag(cfg, "output_hidden_states", output_hidden_states)
        if input_ids is not None:
            input_ids = input_ids.view(-1, input_ids.shape[-1])  # (B, T)
        batch, q_len = self._check_inputs(input_ids, inputs_embeds)
        if use_cache is None:
            use_cache = cfg.use_cache and not self.training
        if use_cache and self.gradient_checkpointing and self.training:
            logger.warning("use_cache=True is incompatible with gradient checkpointing in training; turning it off")
            use_cache = False
        cache = as_cache(past_key_values, len(self.layers))
        if use_cache and cache is None:
            cache = DynamicCache()
        past_len = cache.get_seq_length() if cache is not None else 0
        if past_len + q_len > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {past_len + q_len} tokens ({past_len} cached + {q_len} new) is longer "
                             f"than max_position_embeddings={cfg.max_position_embeddings}")
        self._check_attention_mask(attention_mask, batch, past_len + q_len)
        if head_mask is not None:
            head_mask = self._expand_head_mask(head_mask)
        need_weights = output_attentions or head_mask is not None  # SDPA returns no weights and takes no head mask

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, P)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, past_len, q_len, inputs_embeds.device)
        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)  # (B, T, C)
        h = inputs_embeds + self.embed_positions(position_ids)  # (B, T, C)
        mask = build_attention_mask(attention_mask, q_len, past_len, h.dtype, h.device, need_weights)
        h, all_hidden, all_attn = self._run_layers(h, mask, cache, use_cache, position_ids, output_attentions,
                                                   output_hidden_states, head_mask)
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)  # (B, T, P)
        if all_hidden is not None:
            all_hidden.append(h)
        out = BaseModelOutputWithPast(
            last_hidden_state=h,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_attn) if all_attn is not None else None,
        )
        return out if config_flag(cfg, "use_return_dict", return_dict) else out.to_tuple()

    def _run_layers(self, h: torch.Tensor, mask: torch.Tensor | None, cache: Cache | None, use_cache: bool,
                    position_ids: torch.Tensor, output_attentions: bool, output_hidden_states: bool,
                    head_mask: torch.Tensor | None) -> tuple[torch.Tensor, list | None, list | None]:
        """Each layer gets the hidden states positionally and the rest by keyword, as transformers calls them."""
        all_hidden = [] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(h)
            # LayerDrop: in training, skip each layer with probability `layerdrop`.
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            kwargs = dict(attention_mask=mask, past_key_values=cache, use_cache=use_cache, position_ids=position_ids,
                          output_attentions=output_attentions,
                          layer_head_mask=head_mask[i] if head_mask is not None else None)
            if self.gradient_checkpointing and self.training:
                out = checkpoint(partial(layer, **kwargs), h, **self.checkpoint_kwargs)
            else:
                out = layer(h, **kwargs)
            h = out[0]
            if all_attn is not None:
                all_attn.append(out[1])
        return h, all_hidden, all_attn

    def _check_inputs(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> tuple[int, int]:
        """(batch, new tokens) of whichever of input_ids and inputs_embeds was given (exactly one must be)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            self._check_token_ids(input_ids)
            return input_ids.shape[0], input_ids.shape[1]
        p = self.config.word_embed_proj_dim
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != p:
            raise ValueError(f"inputs_embeds must be (batch, seq, {p}), got {tuple(inputs_embeds.shape)}")
        return inputs_embeds.shape[0], inputs_embeds.shape[1]

    def _check_attention_mask(self, attention_mask: torch.Tensor | None, batch: int, total_len: int) -> None:
        """A (batch, cached + new) mask of ones and zeros. Values are checked only in eager mode: under
        torch.compile or export a check on data would break the graph."""
        if attention_mask is None:
            return
        if tuple(attention_mask.shape) != (batch, total_len):
            raise ValueError(f"attention_mask must be (batch, cached + new tokens) = ({batch}, {total_len}), "
                             f"got {tuple(attention_mask.shape)}")
        if torch.compiler.is_compiling() or not attention_mask.numel():
            return
        if attention_mask.dtype != torch.bool:
            bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)]  # one pass, one host sync
            if bad.numel():
                raise ValueError(f"attention_mask must hold only 1 (attend) and 0 (padding), got {bad[0].item()!r}: "
                                 f"a fractional mask would be cast to 0 and hide those tokens")
        empty = (~attention_mask.bool().any(-1)).nonzero().flatten().tolist()
        if empty:
            warnings.warn(f"attention_mask rows {empty} are all zeros: those rows attend to no token and their "
                          f"outputs are meaningless", stacklevel=2)

    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() and not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(input_ids)
            if bool((lo < 0) | (hi >= self.config.vocab_size)):
                raise ValueError(f"input_ids hold ids in [{int(lo)}, {int(hi)}] but the vocabulary has "
                                 f"{self.config.vocab_size} ids (0 … {self.config.vocab_size - 1})")

    def _expand_head_mask(self, head_mask: torch.Tensor) -> torch.Tensor:
        n_layers, n_heads = len(self.layers), self.config.num_attention_heads
        if head_mask.shape == (n_heads,):
            head_mask = head_mask.expand(n_layers, n_heads)
        if head_mask.shape != (n_layers, n_heads):
            raise ValueError(f"head_mask must be ({n_heads},) or ({n_layers}, {n_heads}), got {tuple(head_mask.shape)}")
        return head_mask


class OPTModel(OPTPreTrainedModel):
    """The bare OPT decoder, returning the last hidden state (word_embed_proj_dim wide: 512 for opt-350m).

    Example:
        >>> import torch
        >>> from optlite import OPTConfig, OPTModel
        >>> model = OPTModel(OPTConfig.from_preset("opt-tiny")).eval()
        >>> model(torch.tensor([[2, 31414, 232]])).last_hidden_state.shape
        torch.Size([1, 3, 64])
    """

    def __init__(self, config: OPTConfig):
        super().__init__(config)
        self.decoder = OPTDecoder(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        return self.decoder(input_ids=input_ids, attention_mask=attention_mask, head_mask=head_mask,
                            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                            return_dict=return_dict, position_ids=position_ids)
