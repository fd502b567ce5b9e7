"""smolvlm: run, train, evaluate and serve SmolVLM vision-language models."""

from smolvlm.api import VLM, load
from smolvlm.config import SmolVLMConfig, TextConfig, VisionConfig, preset
from smolvlm.engine.generate import GenerationConfig, GenerationResult
from smolvlm.errors import SmolVLMError

__version__ = "0.1.0"

__all__ = [
    "VLM",
    "GenerationConfig",
    "GenerationResult",
    "SmolVLMConfig",
    "SmolVLMError",
    "TextConfig",
    "VisionConfig",
    "load",
    "preset",
    "__version__",
]
