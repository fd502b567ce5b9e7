"""Tiny but complete SmolVLM checkpoint folders (weights + tokenizer + chat template + image configs) for tests.

Written by the tests themselves, so nothing is downloaded: a small trained BPE with SmolVLM's added tokens, the official
chat template, 64-px tiles (4 image tokens each) and random weights. Every consumer (engine, CLI, server, training)
loads them exactly like a real hub folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from processing_fixtures import write_processor_folder
from smolvlm.config import SmolVLMConfig, TextConfig, VisionConfig
from smolvlm.model import SmolVLM
from smolvlm.processing import Tokenizer

TILE = 64  # pixels per tile side
LONGEST_EDGE = 128  # images are split into at most 2 x 2 tiles + the global view


def tiny_vlm_config(vocab_size: int, image_token_id: int, pad_token_id: int | None = None) -> SmolVLMConfig:
    """A SmolVLM config small enough to run a forward in milliseconds."""
    return SmolVLMConfig(
        vision=VisionConfig(32, 64, 2, 2, image_size=TILE, patch_size=16),
        text=TextConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_theta=100000.0, max_position_embeddings=2048,
            pad_token_id=pad_token_id,
        ),
        scale_factor=2,
        image_token_id=image_token_id,
    )


def write_tiny_checkpoint(directory: str | Path, seed: int = 0, std: float = 0.5) -> Path:
    """Write a complete tiny SmolVLM folder (random weights, fixed `seed`) and return it."""
    directory = Path(directory)
    write_processor_folder(
        directory, family="512", layout="v4", max_image_size={"longest_edge": TILE}, size={"longest_edge": LONGEST_EDGE}
    )
    processor_config = directory / "processor_config.json"
    data = json.loads(processor_config.read_text())
    data["image_seq_len"] = (TILE // 16) ** 2 // 4
    processor_config.write_text(json.dumps(data, indent=2))
    tokenizer = Tokenizer.from_pretrained(directory)
    config = tiny_vlm_config(tokenizer.vocab_size, tokenizer.token_to_id("<image>"), tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = SmolVLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    model.save_pretrained(directory)
    eos = tokenizer.token_to_id("<end_of_utterance>")
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return directory
