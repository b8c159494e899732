"""optlite: Meta's OPT language models in plain PyTorch, numerically identical to transformers' OPT."""

from .cache import DynamicCache, StaticCache
from .config import OPTConfig
from .convert import convert
from .heads import OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification
from .modeling import OPTModel, OPTPreTrainedModel
from .tokenizer import BatchEncoding, OPTTokenizer

__version__ = "0.1.0"

__all__ = [
    "BatchEncoding",
    "DynamicCache",
    "convert",
    "OPTConfig",
    "OPTForCausalLM",
    "OPTForQuestionAnswering",
    "OPTForSequenceClassification",
    "OPTModel",
    "OPTPreTrainedModel",
    "OPTTokenizer",
    "StaticCache",
]
