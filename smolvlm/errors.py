"""One exception family for everything smolvlm raises on purpose."""


class SmolVLMError(Exception):
    """Base class: every error smolvlm raises deliberately derives from it."""


class ConfigError(SmolVLMError, ValueError):
    """A config.json (or preset) is missing, malformed or of an unknown model type."""


class CheckpointError(SmolVLMError):
    """A checkpoint folder or weight file cannot be found, read or matched to the model."""


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """A model name resolves to neither a local folder nor a reachable hub repository."""


class ImageError(SmolVLMError, ValueError):
    """An image input cannot be decoded, is empty, or exceeds a configured limit."""


class PromptError(SmolVLMError, ValueError):
    """Messages, image markers and images do not fit together."""


class GenerationError(SmolVLMError):
    """Generation options are invalid or the request cannot be served."""


class DataError(SmolVLMError, ValueError):
    """Training or evaluation data is malformed (the message names file and line)."""
