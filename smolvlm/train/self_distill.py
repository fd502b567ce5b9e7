"""Plain-text chat samples answered by a model itself (self-distillation), to keep its chat while it learns pictures.

An adapter trained only on one- to three-word answers about pictures makes the language model terse, and in the end
forgets facts it knew ("What is the capital of France?" -> "France"). Mixing in general questions answered by the
untrained language model keeps its own manner: the adapter learns to leave plain text as it was.

    prompts file (one question a line) ─ model, greedy ─▶ answers cut back to whole sentences ─▶ OUT/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from smolvlm.errors import DataError, SmolVLMError
from smolvlm.train.synthetic import qa_record

# The end of a sentence (. ! ? then a space or the end) or of a line (a list item); not a list number's "3. ".
_SENTENCE_END = re.compile(r"(?<!^\d)(?<!^\d\d)[.!?](?=\s|$)|\n", re.MULTILINE)


def read_prompts(path: str | Path) -> list[str]:
    """The questions of a prompts file: one a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such prompts file (one question a line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise DataError(f"{path}: no prompts in it (one question a line; # starts a comment)")
    return prompts


def whole_sentences(text: str) -> str:
    """`text` cut after its last finished sentence or line ("" if none finished): for answers cut by a token limit."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]].strip() if ends else ""


def check_repeat(repeat: int) -> None:
    """Refuse a copy count below one."""
    if repeat < 1:
        raise DataError(f"--repeat must be 1 or more, got {repeat}")


def answer_prompts(vlm: Any, prompts: Sequence[str], max_new_tokens: int = 96, batch_size: int = 8,
                   progress: bool = True) -> list[tuple[str, str]]:
    """Greedy answers of `vlm` (a `smolvlm.VLM`) to each prompt, cut back to whole sentences: (answer, finish)."""
    answers: list[tuple[str, str]] = []
    bar = tqdm(total=len(prompts), desc="answering prompts", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch = [[{"role": "user", "content": p}] for p in prompts[start:start + batch_size]]
        for result in vlm.generate(batch, return_result=True, max_new_tokens=max_new_tokens, temperature=0.0):
            text = result.text.strip()
            answers.append((whole_sentences(text) if result.finish_reason == "length" else text,
                            result.finish_reason))
        bar.update(len(batch))
    bar.close()
    return answers


def write_chat_dataset(out_dir: str | Path, vlm: Any, prompts: Sequence[str], repeat: int = 1,
                       max_new_tokens: int = 96, batch_size: int = 8, progress: bool = True) -> tuple[Path, int]:
    """Write OUT/train.jsonl: each prompt with the model's answer, `repeat` times; return (path, prompts kept).

    A prompt whose answer has no finished sentence within `max_new_tokens` is left out.
    """
    check_repeat(repeat)
    answers = answer_prompts(vlm, prompts, max_new_tokens, batch_size, progress)
    kept = [(i, p, a, finish) for i, (p, (a, finish)) in enumerate(zip(prompts, answers)) if a]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "train.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for copy in range(repeat):
            for i, prompt, answer, finish in kept:
                meta = {"prompt_index": i, "copy": copy, "finish_reason": finish}
                record = qa_record(f"chat-{i:04d}-{copy}", "chat", [], prompt, answer, meta)  # no image
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path, len(kept)


def main(argv: Sequence[str] | None = None) -> int:
    """`smolvlm data chat --prompts FILE --model M --out DIR [--repeat K] [--max-new-tokens N] [--json]`."""
    parser = argparse.ArgumentParser(
        prog="smolvlm data chat",
        description="Write plain-text chat samples answered by a model itself (greedy), to mix into training.")
    parser.add_argument("--prompts", required=True, help="text file, one question a line (# starts a comment)")
    parser.add_argument("--model", required=True, help="the model that answers: a folder, hub id, smollm2 or demo")
    parser.add_argument("--out", required=True, help="output folder: train.jsonl")
    parser.add_argument("--repeat", type=int, default=1, help="write every sample this many times (its weight)")
    parser.add_argument("--max-new-tokens", type=int, default=96,
                        help="answer length limit; a cut answer keeps its whole sentences")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of a sentence")
    args = parser.parse_args(argv)
    try:
        prompts = read_prompts(args.prompts)
        check_repeat(args.repeat)  # before the model loads
        from smolvlm.api import load

        vlm = load(args.model, device=args.device)
        path, kept = write_chat_dataset(args.out, vlm, prompts, args.repeat, args.max_new_tokens, args.batch_size,
                                        progress=not args.json)
    except SmolVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {"path": str(path), "prompts": len(prompts), "kept": kept, "repeat": args.repeat,
               "samples": kept * args.repeat, "model": args.model, "max_new_tokens": args.max_new_tokens}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {summary['samples']} chat samples ({kept} of {len(prompts)} prompts answered in whole "
              f"sentences, x{args.repeat}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
