"""Processing: chat template, images, prompt expansion and tokenizer → model-ready `Batch`."""

from smolvlm.processing.chat import ChatTemplate, load_chat_template, message_images, normalize_messages
from smolvlm.processing.image import ImageProcessorConfig, ImageTiles, batch_tiles, load_image, split_image
from smolvlm.processing.processor import Batch, Processor
from smolvlm.processing.prompt import ImageTokens, expand_image_markers, image_prompt
from smolvlm.processing.tokenizer import Tokenizer

__all__ = [
    "Batch",
    "ChatTemplate",
    "ImageProcessorConfig",
    "ImageTiles",
    "ImageTokens",
    "Processor",
    "Tokenizer",
    "batch_tiles",
    "expand_image_markers",
    "image_prompt",
    "load_chat_template",
    "load_image",
    "message_images",
    "normalize_messages",
    "split_image",
]
