"""optlite: Meta's OPT language models in plain PyTorch, numerically identical to transformers' OPT."""

from .cache import DynamicCache
from .config import OPTConfig
from .generation import GenerationConfig, generate_text
from .heads import OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification
from .modeling import OPTModel, OPTPreTrainedModel
from .streaming import BaseStreamer, TextIteratorStreamer, TextStreamer

__version__ = "0.1.0"

__all__ = [
    "BaseStreamer",
    "DynamicCache",
    "GenerationConfig",
    "OPTConfig",
    "OPTForCausalLM",
    "OPTForQuestionAnswering",
    "OPTForSequenceClassification",
    "OPTModel",
    "OPTPreTrainedModel",
    "TextIteratorStreamer",
    "TextStreamer",
    "generate_text",
]
