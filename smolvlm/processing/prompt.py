"""Prompt expansion: every `<image>` marker in the rendered text becomes the token pattern of its image's tiles.

Split image (rows x cols tiles + a global view), one row per line:
    <fake_token_around_image><row_1_col_1><image>*n ... <fake_token_around_image><row_1_col_C><image>*n\n
    ...
    \n<fake_token_around_image><global-img><image>*n<fake_token_around_image>
Single view:
    <fake_token_around_image><global-img><image>*n<fake_token_around_image>
with n = tokens_per_tile (`image_seq_len`), as transformers' SmolVLMProcessor writes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from smolvlm.errors import PromptError


@dataclass(frozen=True)
class ImageTokens:
    """The strings of the image token family (read from the tokenizer; these are the SmolVLM defaults)."""

    image: str = "<image>"
    fake_around_image: str = "<fake_token_around_image>"
    global_image: str = "<global-img>"


def image_prompt(rows: int, cols: int, tokens_per_tile: int, tokens: ImageTokens = ImageTokens()) -> str:
    """The expansion of one image: the tile grid plus global view, or the single view when rows = cols = 0."""
    run = tokens.image * tokens_per_tile
    global_view = f"{tokens.fake_around_image}{tokens.global_image}{run}{tokens.fake_around_image}"
    if rows == 0 and cols == 0:
        return global_view
    grid = "".join(
        "".join(f"{tokens.fake_around_image}<row_{r}_col_{c}>{run}" for c in range(1, cols + 1)) + "\n"
        for r in range(1, rows + 1)
    )
    return f"{grid}\n{global_view}"


def count_image_markers(text: str, tokens: ImageTokens = ImageTokens()) -> int:
    """How many image markers a (not yet expanded) prompt holds."""
    return text.count(tokens.image)


def expand_image_markers(
    texts: list[str], image_prompts: list[list[str]], tokens: ImageTokens = ImageTokens()
) -> list[str]:
    """Replace the i-th marker of each text with that sample's i-th image prompt; counts must match exactly."""
    if len(texts) != len(image_prompts):
        raise PromptError(f"{len(texts)} prompts but image lists for {len(image_prompts)} samples")
    expanded = []
    for index, (text, prompts) in enumerate(zip(texts, image_prompts)):
        pieces = text.split(tokens.image)
        markers = len(pieces) - 1
        if markers != len(prompts):
            raise PromptError(
                f"sample {index}: the text has {markers} {tokens.image} marker(s) but {len(prompts)} image(s) were "
                f"given; put exactly one {tokens.image} (or one image part in the message) per image"
            )
        out = [pieces[0]]
        for prompt, piece in zip(prompts, pieces[1:]):
            out += [prompt, piece]
        expanded.append("".join(out))
    return expanded
