"""Processor folders for tests: a small trained BPE with SmolVLM's added tokens, the official chat template and the
image/processor configs of both tile families, in the v4-era hub layout or the transformers v5 layout.

Also builds the *reference*: transformers' SmolVLMProcessor from such a folder, with the PIL image processor and a
stand-in video processor (the real one needs torchvision, which is not installed; images never touch it).

Sources: the chat template is the one in HuggingFaceTB/SmolVLM-256M-Instruct's `chat_template.json` (403 characters,
also transformers' own SmolVLM/Idefics3 processor tests); the image configs are the hub `preprocessor_config.json`
values of SmolVLM-256M/500M-Instruct (512-px tiles, longest edge 2048, 64 tokens) and SmolVLM-Instruct 2.2B (384-px
tiles, longest edge 1536, 81 tokens); the tokenizer_config keys follow the SmolVLM(2) hub files.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# SmolLM2's own special tokens, ids 0..16 of its 49152-entry base vocabulary.
BASE_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
]  # fmt: skip

# Added tokens in the order of the 256M/500M tokenizer: <global-img> first, <end_of_utterance> last.
ADDED_TOKENS_256M = (
    ["<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<fake_token_around_image>", "<image>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(88)]
    + ["<end_of_utterance>"]
)
# The 2.2B SmolVLM-Instruct tokenizer adds only three: rows/cols and <global-img> are then plain text.
ADDED_TOKENS_2B = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]

FAMILIES: dict[str, dict[str, int]] = {
    "512": {"longest_edge": 2048, "tile": 512, "image_seq_len": 64},  # SmolVLM-256M / 500M-Instruct
    "384": {"longest_edge": 1536, "tile": 384, "image_seq_len": 81},  # SmolVLM-Instruct (2.2B)
}


def _training_text() -> list[str]:
    """Built-in English text (stdlib docstrings) to train a small BPE on, deterministic per Python version."""
    import argparse, collections, json as json_module, logging, pathlib, re, string, textwrap, unittest  # noqa: E401

    texts = []
    for module in (argparse, collections, json_module, logging, pathlib, re, string, textwrap, unittest):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc:
                texts.append(doc)
    texts.append("The capital of France is Paris. 0123456789 User: Assistant: What is in this image?")
    return texts


@functools.lru_cache(maxsize=None)
def _base_tokenizer_json(vocab_size: int) -> str:
    tokenizer = Tokenizer(models.BPE())
    # SmolLM2's pipeline: single digits, then GPT-2 byte-level pre-tokenization.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BASE_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    return tokenizer.to_str()


def build_tokenizer(variant: str = "256m", base_vocab_size: int = 1200) -> Tokenizer:
    """A byte-level BPE (SmolLM2 pre-tokenizer) with the SmolVLM added tokens of `variant` ('256m' or '2.2b')."""
    tokenizer = Tokenizer.from_str(_base_tokenizer_json(base_vocab_size))
    added = ADDED_TOKENS_256M if variant == "256m" else ADDED_TOKENS_2B
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer, variant: str = "256m") -> dict[str, Any]:
    """`tokenizer_config.json` in the shape of the SmolVLM hub files."""
    decoder = {
        str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in sorted(tokenizer.get_added_tokens_decoder().items())
    }  # fmt: skip
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        "bos_token": "<|im_start|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<end_of_utterance>",
        "legacy": False,
        "model_max_length": 8192 if variant == "256m" else 16384,
        "pad_token": "<|im_end|>",
        "processor_class": "Idefics3Processor",
        "tokenizer_class": "GPT2Tokenizer",
        "truncation_side": "left",
        "unk_token": "<|endoftext|>",
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=False),
    }


def image_processor_config(family: str) -> dict[str, Any]:
    """The hub `preprocessor_config.json` of a tile family ('512' or '384')."""
    f = FAMILIES[family]
    return {
        "do_convert_rgb": True,
        "do_image_splitting": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "Idefics3ImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "max_image_size": {"longest_edge": f["tile"]},
        "processor_class": "Idefics3Processor",
        "resample": 1,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": f["longest_edge"]},
    }


def write_processor_folder(
    directory: str | Path, family: str = "512", layout: str = "v4", variant: str = "256m", **image_overrides: Any
) -> Path:
    """Write a SmolVLM processor folder; `layout` 'v4' (hub files) or 'v5' (save_pretrained); returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(variant)
    tokenizer.save(str(directory / "tokenizer.json"))
    tok_config = tokenizer_config(tokenizer, variant)
    image_config = {**image_processor_config(family), **image_overrides}
    image_seq_len = FAMILIES[family]["image_seq_len"]
    special_map = {k: tok_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    special_map["additional_special_tokens"] = tok_config["additional_special_tokens"]
    if layout == "v4":
        (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
        (directory / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2))
        processor = {"image_seq_len": image_seq_len, "processor_class": "Idefics3Processor"}
        (directory / "processor_config.json").write_text(json.dumps(processor, indent=2))
        (directory / "chat_template.json").write_text(json.dumps({"chat_template": SMOLVLM_CHAT_TEMPLATE}, indent=2))
    elif layout == "v5":
        tok_config["processor_class"] = "SmolVLMProcessor"
        tok_config["tokenizer_class"] = "TokenizersBackend"
        tok_config["extra_special_tokens"] = tok_config.pop("additional_special_tokens")
        tok_config.pop("added_tokens_decoder")
        (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        image_config.update(image_processor_type="SmolVLMImageProcessor", processor_class="SmolVLMProcessor")
        video_config = {**image_config, "video_processor_type": "SmolVLMVideoProcessor", "do_sample_frames": False}
        del video_config["image_processor_type"], video_config["do_image_splitting"]
        processor = {
            "image_processor": image_config,
            "image_seq_len": image_seq_len,
            "processor_class": "SmolVLMProcessor",
            "video_processor": video_config,
        }
        (directory / "processor_config.json").write_text(json.dumps(processor, indent=2))
        (directory / "chat_template.jinja").write_text(SMOLVLM_CHAT_TEMPLATE)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return directory


# ---- the reference (transformers, test-only) ----


def reference_processor(directory: str | Path) -> Any:
    """transformers' SmolVLMProcessor for a folder: PIL image processor, TokenizersBackend, stand-in video processor.

    `AutoTokenizer` resolves SmolVLM checkpoints to `TokenizersBackend` (smolvlm is in transformers' list of models
    with a wrong hub `tokenizer_class`), i.e. the folder's tokenizer.json as is; we build that class directly since a
    bare processor folder has no config.json to resolve the model type from.
    """
    from transformers import SmolVLMImageProcessorPil, SmolVLMProcessor
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    directory = Path(directory)
    tokenizer = TokenizersBackend.from_pretrained(str(directory))
    image_processor = SmolVLMImageProcessorPil.from_pretrained(str(directory))
    processor_dict, _ = SmolVLMProcessor.get_processor_dict(str(directory))

    class ReferenceProcessor(SmolVLMProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> type:
            # transformers only exposes the video processor base class with torchvision installed
            if argument_name == "video_processor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    return ReferenceProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=_stand_in_video_processor(),
        image_seq_len=processor_dict.get("image_seq_len", 169),
        chat_template=processor_dict.get("chat_template"),
    )


def _stand_in_video_processor() -> Any:
    from transformers.video_processing_utils import VideoProcessorMixin

    class StandInVideoProcessor(VideoProcessorMixin):
        """Satisfies SmolVLMProcessor's constructor; images never reach it."""

        num_frames = None
        fps = None

    return StandInVideoProcessor()
