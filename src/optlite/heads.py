"""Task heads on top of OPTModel: causal LM, sequence classification, extractive question answering.

Each head reads the decoder's last hidden state, which is word_embed_proj_dim wide (512 for opt-350m).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import OPTConfig
from .cpu_linear import project
from .cross_entropy import IGNORE_INDEX, cross_entropy
from .generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from .generation import generate as _generate
from .modeling import OPTModel, OPTPreTrainedModel, config_flag
from .outputs import CausalLMOutputWithPast, QuestionAnsweringModelOutput, SequenceClassifierOutputWithPast

logger = logging.getLogger(__name__)


class OPTForCausalLM(OPTPreTrainedModel):
    """OPT with its language-modelling head (tied to the input embeddings).

    Example:
        >>> import torch
        >>> from optlite import OPTConfig, OPTForCausalLM
        >>> model = OPTForCausalLM(OPTConfig.from_preset("opt-tiny")).eval()
        >>> ids = torch.tensor([[2, 31414, 6, 127]])
        >>> out = model(ids, labels=ids)
        >>> out.logits.shape, out.loss.dim()
        (torch.Size([1, 4, 50272]), 0)
    """

    _tied_weights_keys = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    def __init__(self, config: OPTConfig):
        super().__init__(config)
        self.model = OPTModel(config)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, next_sequence_length: int | None = None,
                                      past_key_values: Any = None, attention_mask: torch.Tensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None, is_first_iteration: bool = False,
                                      **kwargs: Any) -> dict[str, Any]:
        """The keyword arguments of one forward call in a decoding loop, with transformers' semantics: the last
        `next_sequence_length` ids (all when None), or `inputs_embeds` on the first step; `position_ids` cut to
        the same length; the full attention mask; other keywords passed through (`labels` dropped).

        Example:
            >>> import torch
            >>> from optlite import OPTConfig, OPTForCausalLM
            >>> model = OPTForCausalLM(OPTConfig.from_preset("opt-tiny"))
            >>> step = model.prepare_inputs_for_generation(torch.tensor([[2, 5, 6]]), next_sequence_length=1,
            ...                                            use_cache=True)
            >>> step["input_ids"].tolist(), step["use_cache"]
            ([[6]], True)
        """
        inputs: dict[str, Any] = {}
        if inputs_embeds is not None and is_first_iteration:
            embeds = inputs_embeds[:, -next_sequence_length:] if next_sequence_length is not None else inputs_embeds
            inputs["input_ids"] = None
            inputs["inputs_embeds"] = embeds.clone(memory_format=torch.contiguous_format)
        else:
            ids = input_ids[:, -next_sequence_length:] if next_sequence_length is not None else input_ids
            inputs["input_ids"] = ids.clone(memory_format=torch.contiguous_format)  # a contiguous step, as theirs
        length = (inputs["input_ids"] if inputs["input_ids"] is not None else inputs["inputs_embeds"]).shape[1]
        if past_key_values is not None:
            inputs["past_key_values"] = past_key_values
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is not None:
            inputs["position_ids"] = position_ids[..., -length:].clone(memory_format=torch.contiguous_format)
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        for key, value in kwargs.items():
            if key not in ("labels", "next_sequence_length") and key not in inputs:
                inputs[key] = value
        return inputs

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> CausalLMOutputWithPast | tuple:
        """`labels` are the input ids themselves (shifted inside); -100 marks positions left out of the loss.
        `logits_to_keep=k` computes logits for the last k positions only (0: all; a 1-D tensor: those positions)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, head_mask=head_mask,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         return_dict=True, position_ids=position_ids)
        h = out.last_hidden_state
        # An int keeps the last k positions (0: all), a tensor the positions it lists, as transformers.
        positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = project(self.lm_head, h[:, positions])  # (B, T, V)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states, attentions=out.attentions)
        return result if config_flag(self.config, "use_return_dict", return_dict) else result.to_tuple()

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
        """Continue the prompts: greedy decoding, sampling or beam search, token for token as transformers'
        `generate`. Returns prompt + new tokens; the settings (max_new_tokens, do_sample, top_p, num_beams, ...)
        and their defaults are those of `optlite.generation.generate`, which this calls.

        Example:
            >>> import torch
            >>> from optlite import OPTConfig, OPTForCausalLM
            >>> model = OPTForCausalLM(OPTConfig.from_preset("opt-tiny")).eval()
            >>> prompt = torch.tensor([[2, 31414, 6, 127]])
            >>> model.generate(prompt, max_new_tokens=5).shape  # greedy
            torch.Size([1, 9])
            >>> out = model.generate(prompt, max_new_tokens=5, do_sample=True, top_p=0.9,
            ...                      generator=torch.Generator().manual_seed(0))
            >>> model.generate(prompt, max_new_tokens=5, num_beams=3, num_return_sequences=2).shape[0]
            2
        """
        return _generate(self, input_ids, attention_mask, **kwargs)


def _check_class_ids(ids: torch.Tensor, n: int, name: str, expected: str,
                     ignored: int | None = IGNORE_INDEX) -> None:
    """A ValueError naming the first id outside [0, n) (the loss would raise a bare IndexError, or assert on CUDA)."""
    if torch.compiler.is_compiling():  # a data-dependent check: left out of traced graphs, as the input_ids check
        return
    bad = ((ids < 0) | (ids >= n)) & (ids != ignored if ignored is not None else True)
    if bad.any():
        where = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{name} must be {expected.format(n=n)}; got {ids[where].item()} at index {where}")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """The next-token targets of causal LM labels (B, T): position t predicts labels[t + 1], the last predicts
    nothing (IGNORE_INDEX).

    Example:
        >>> shift_labels(torch.tensor([[5, 6, 7]]))
        tensor([[   6,    7, -100]])
    """
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in fp32: position t predicts labels[t + 1]; -100 is ignored."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be (batch, seq) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    # Shift the labels, not the logits: slicing the logits would copy the largest tensor of the step.
    _check_class_ids(labels, logits.shape[-1], "labels", "token ids in [0, vocab_size={n}) or -100 (ignored)")
    targets = shift_labels(labels.to(logits.device))
    return cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def span_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
              end_positions: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Extractive-QA loss, the mean of the start and end cross entropies over (B, T) logits. Positions outside
    the sequence are clamped to its length and ignored, as in transformers; `reduction="none"` gives one loss
    per row (0 for an ignored one).

    Example:
        >>> logits = torch.zeros(1, 4)
        >>> round(span_loss(logits, logits, torch.tensor([1]), torch.tensor([2])).item(), 4)  # log(4)
        1.3863
    """
    ignored = start_logits.shape[1]
    start = start_positions.reshape(-1).clamp(0, ignored).to(start_logits.device)
    end = end_positions.reshape(-1).clamp(0, ignored).to(end_logits.device)
    return (F.cross_entropy(start_logits, start, ignore_index=ignored, reduction=reduction)
            + F.cross_entropy(end_logits, end, ignore_index=ignored, reduction=reduction)) / 2


class OPTForSequenceClassification(OPTPreTrainedModel):
    """OPT with a linear classifier on the last non-padding token of each row (left or right padding).

    The loss follows `config.problem_type`, chosen on first use as transformers chooses it: regression for
    one label, single-label cross entropy for integer labels, multi-label BCE otherwise.

    Example:
        >>> import torch
        >>> from optlite import OPTConfig, OPTForSequenceClassification
        >>> model = OPTForSequenceClassification(OPTConfig.from_preset("opt-tiny", num_labels=3)).eval()
        >>> out = model(torch.tensor([[2, 31414, 6, 1], [2, 250, 1345, 9]]), labels=torch.tensor([0, 2]))
        >>> out.logits.shape
        torch.Size([2, 3])
    """

    def __init__(self, config: OPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = OPTModel(config)
        self.score = nn.Linear(config.word_embed_proj_dim, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> SequenceClassifierOutputWithPast | tuple:
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("batches of more than one row need config.pad_token_id to find each row's last token")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, head_mask=head_mask,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         return_dict=True, position_ids=position_ids)
        logits = self.score(out.last_hidden_state)  # (B, T, num_labels)
        if pad is not None and input_ids is not None:
            # The rightmost token that is not padding, so left and right padding both work.
            not_pad = (input_ids != pad).to(logits.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * not_pad).argmax(-1)
        else:
            if inputs_embeds is not None and pad is not None:
                logger.warning("with inputs_embeds padding cannot be detected; pooling the last position of each row")
            last = -1
        pooled = logits[torch.arange(batch, device=logits.device), last]  # (B, num_labels)
        loss = self._loss(pooled, labels) if labels is not None else None
        result = SequenceClassifierOutputWithPast(loss=loss, logits=pooled, past_key_values=out.past_key_values,
                                                  hidden_states=out.hidden_states, attentions=out.attentions)
        return result if config_flag(self.config, "use_return_dict", return_dict) else result.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(logits.device)
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze())
            return F.mse_loss(logits, labels)
        if self.config.problem_type == "single_label_classification":
            _check_class_ids(labels, self.num_labels, "labels", "class ids in [0, num_labels={n})", ignored=None)
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels)


class OPTForQuestionAnswering(OPTPreTrainedModel):
    """OPT with a span head: a start and an end logit per token (extractive QA, SQuAD style).

    Example:
        >>> import torch
        >>> from optlite import OPTConfig, OPTForQuestionAnswering
        >>> model = OPTForQuestionAnswering(OPTConfig.from_preset("opt-tiny")).eval()
        >>> out = model(torch.tensor([[2, 31414, 6, 127]]), start_positions=torch.tensor([1]),
        ...             end_positions=torch.tensor([2]))
        >>> out.start_logits.shape, out.end_logits.shape
        (torch.Size([1, 4]), torch.Size([1, 4]))
    """

    def __init__(self, config: OPTConfig):
        super().__init__(config)
        self.model = OPTModel(config)
        self.qa_outputs = nn.Linear(config.word_embed_proj_dim, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> QuestionAnsweringModelOutput | tuple:
        """Positions outside the sequence are clamped to its length and ignored by the loss, as in transformers."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, head_mask=head_mask,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         return_dict=True, position_ids=position_ids)
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).unbind(-1)  # 2 x (B, T)
        start_logits, end_logits = start_logits.contiguous(), end_logits.contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        result = QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                              hidden_states=out.hidden_states, attentions=out.attentions)
        return result if config_flag(self.config, "use_return_dict", return_dict) else result.to_tuple()
