"""optlite: Meta's OPT language models in plain PyTorch, numerically identical to transformers' OPT."""

from .cache import DynamicCache, StaticCache
from .config import OPTConfig
from .convert import convert
from .generation import GenerationConfig, generate_text
from .heads import OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification
from .modeling import OPTModel, OPTPreTrainedModel
from .perplexity import perplexity
from .streaming import BaseStreamer, TextIteratorStreamer, TextStreamer
from .tokenizer import BatchEncoding, OPTTokenizer

__version__ = "0.1.0"

__all__ = [
    "BaseStreamer",
    "BatchEncoding",
    "DynamicCache",
    "GenerationConfig",
    "OPTConfig",
    "OPTForCausalLM",
    "OPTForQuestionAnswering",
    "OPTForSequenceClassification",
    "OPTModel",
    "OPTPreTrainedModel",
    "OPTTokenizer",
    "StaticCache",
    "TextIteratorStreamer",
    "TextStreamer",
    "convert",
    "generate_text",
    "perplexity",
]
