"""Pure-torch SmolVLM: vision encoder, connector, text decoder and the assembled model."""

from smolvlm.model.connector import Connector, pixel_shuffle
from smolvlm.model.smolvlm import SmolVLM, SmolVLMOutput
from smolvlm.model.text import CausalLM, TextDecoder
from smolvlm.model.vision import VisionTransformer

__all__ = ["CausalLM", "Connector", "SmolVLM", "SmolVLMOutput", "TextDecoder", "VisionTransformer", "pixel_shuffle"]
