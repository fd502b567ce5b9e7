"""smolvlm: run, train, evaluate and serve SmolVLM vision-language models."""

from smolvlm.config import SmolVLMConfig, TextConfig, VisionConfig, preset
from smolvlm.errors import SmolVLMError

__version__ = "0.1.0"

__all__ = ["SmolVLMConfig", "TextConfig", "VisionConfig", "preset", "SmolVLMError", "__version__"]
