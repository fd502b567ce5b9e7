"""The `smolvlm` command: run, chat, describe, info, convert; serve, train, eval, data and merge-lora delegate."""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from smolvlm.errors import SmolVLMError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Subcommands implemented elsewhere: name -> (module, function taking argv and returning an exit code).
DELEGATED = {
    "serve": ("smolvlm.serve.app", "main", "start the OpenAI-compatible HTTP server with its web page"),
    "train": ("smolvlm.train.commands", "train_main", "fine-tune a model (full, staged, LoRA, distillation)"),
    "eval": ("smolvlm.train.commands", "eval_main", "generate answers for a dataset and score them"),
    "data": ("smolvlm.train.commands", "data_main",
             "make datasets (`data synth`: synthetic scenes; `data chat`: a model's own plain-text answers)"),
    "merge-lora": ("smolvlm.train.commands", "merge_lora_main", "merge a LoRA adapter into a full checkpoint"),
}


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default="demo",
                        help="checkpoint folder, hub id, .gguf file, 'smollm2' or 'demo' (default)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="decode through torch.compile: faster per token after seconds of compiling")


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--longest-edge", type=int, default=None,
                        help="resize images so the longest edge is this many pixels (N x tile size: fewer tiles, faster)")


def _generation_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop))


def _load(args: argparse.Namespace):
    from smolvlm.api import load

    vlm = load(args.model, device=args.device, dtype=args.dtype, compile=args.compile)
    if getattr(args, "longest_edge", None) and vlm.supports_images:
        vlm.processor = vlm.processor.with_image_config(longest_edge=args.longest_edge)
    return vlm


def cmd_run(args: argparse.Namespace) -> int:
    """One question (with optional images) -> one answer."""
    vlm = _load(args)
    options = _generation_options(args)
    if args.json:
        result = vlm.generate(args.prompt, images=args.image, return_result=True, **options)
        print(json.dumps({"model": vlm.name, "answer": result.text, "finish_reason": result.finish_reason,
                          "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
                          "prefill_seconds": round(result.prefill_seconds, 4),
                          "decode_seconds": round(result.decode_seconds, 4)}))
        return 0
    for piece in vlm.stream(args.prompt, images=args.image, **options):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat: streaming answers, /image PATH to attach, /reset, /exit."""
    from smolvlm.processing import load_image

    vlm = _load(args)
    options = _generation_options(args)
    history: list[dict[str, Any]] = []
    pending: list[str] = list(args.image)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{vlm.name} — /image PATH attaches a picture, /reset forgets, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history, pending = [], []
            print("(conversation reset)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                load_image(path)
            except SmolVLMError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            pending.append(path)
            print(f"(attached {path})", file=sys.stderr)
            continue
        parts: list[dict[str, Any]] = [{"type": "image", "image": p} for p in pending]
        parts.append({"type": "text", "text": line})
        message = {"role": "user", "content": parts if pending else line}
        try:
            answer = []
            for piece in vlm.stream(history + [message], **options):
                answer.append(piece)
                print(piece, end="", flush=True)
            print()
        except SmolVLMError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        pending = []
        history += [message, {"role": "assistant", "content": "".join(answer)}]


def find_images(patterns: Sequence[str]) -> list[Path]:
    """Image files named by paths, folders (searched recursively) or glob patterns, sorted, without repeats."""
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in pattern for ch in "*?["):
            found += sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def _done_images(out: Path) -> set[str]:
    """Images already answered in a previous run's JSONL (a torn last line from a killed run is ignored)."""
    done: set[str] = set()
    if not out.exists():
        return done
    for line in out.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "answer" in record:
            done.add(record["image"])
    return done


def _batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def cmd_describe(args: argparse.Namespace) -> int:
    """Answer one prompt for every image of a folder or glob, batched, into JSONL; resumable."""
    from tqdm import tqdm

    from smolvlm.processing import load_image

    images = find_images(args.images)
    if not images:
        raise SmolVLMError(f"no images found in {' '.join(args.images)}")
    out = Path(args.out)
    done = _done_images(out) if args.resume else set()
    if not args.resume and out.exists() and out.stat().st_size:
        raise SmolVLMError(f"{out} exists; pass --resume to continue it or choose another --out")
    todo = [p for p in images if str(p) not in done]
    vlm = _load(args)
    options = _generation_options(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    answered = failed = 0
    if out.exists() and out.stat().st_size and not out.read_bytes().endswith(b"\n"):
        with out.open("a", encoding="utf-8") as f:  # a killed run may have left half a line
            f.write("\n")
    with out.open("a", encoding="utf-8") as f, tqdm(total=len(todo), desc="describe", unit="img",
                                                      disable=args.json or None) as bar:
        for batch in _batches(todo, args.batch_size):
            readable = []  # (path, decoded image): each file is read and decoded once
            for path in batch:
                try:
                    readable.append((path, load_image(path, vlm.processor.max_pixels)))
                except SmolVLMError as e:
                    failed += 1
                    f.write(json.dumps({"image": str(path), "error": str(e)}) + "\n")
                    print(f"skipped {path}: {e}", file=sys.stderr)
            if readable:
                conversations = [
                    [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.prompt}]}]
                    for _, image in readable
                ]
                for (path, _), answer in zip(readable, vlm.generate(conversations, **options)):
                    f.write(json.dumps({"image": str(path), "prompt": args.prompt, "answer": answer}) + "\n")
                    answered += 1
            f.flush()
            bar.update(len(batch))
    summary = {"out": str(out), "answered": answered, "failed": failed, "skipped_done": len(images) - len(todo)}
    print(json.dumps(summary) if args.json else
          f"{answered} answered, {failed} unreadable, {summary['skipped_done']} already done -> {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print what a checkpoint is."""
    info = _load(args).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:16} {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a llama GGUF (e.g. SmolLM2) into a Hugging Face folder."""
    from smolvlm.weights.gguf import find_smollm2_gguf, gguf_to_hf_folder

    source = find_smollm2_gguf() if args.gguf == "smollm2" else Path(args.gguf)
    out = gguf_to_hf_folder(source, args.out)
    print(json.dumps({"out": str(out)}) if args.json else f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `smolvlm` command."""
    parser = argparse.ArgumentParser(prog="smolvlm", description="Run, chat with, serve, train and evaluate SmolVLM models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="answer one prompt (with optional images)")
    _add_model_options(run)
    _add_generation_options(run)
    run.add_argument("-i", "--image", action="append", default=[], help="image path, data: URL (repeatable)")
    run.add_argument("prompt")
    run.add_argument("--json", action="store_true", help="print the answer, usage and timings as JSON")
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="interactive chat (streaming; /image PATH, /reset, /exit)")
    _add_model_options(chat)
    _add_generation_options(chat)
    chat.add_argument("-i", "--image", action="append", default=[], help="attach an image to the first message")
    chat.set_defaults(func=cmd_chat)

    describe = sub.add_parser("describe", help="answer a prompt for every image in folders/globs into JSONL")
    _add_model_options(describe)
    _add_generation_options(describe)
    describe.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    describe.add_argument("-p", "--prompt", default="Describe this image.")
    describe.add_argument("-o", "--out", default="descriptions.jsonl")
    describe.add_argument("--batch-size", type=int, default=4)
    describe.add_argument("--resume", action="store_true", help="skip images already answered in --out")
    describe.add_argument("--json", action="store_true", help="print the summary as JSON")
    describe.set_defaults(func=cmd_describe)

    info = sub.add_parser("info", help="what a checkpoint is: sizes, tiles, tokens per tile, dtype, memory")
    _add_model_options(info)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    convert = sub.add_parser("convert", help="convert a llama GGUF ('smollm2' for the bundled one) to a HF folder")
    convert.add_argument("gguf")
    convert.add_argument("out")
    convert.add_argument("--json", action="store_true")
    convert.set_defaults(func=cmd_convert)

    for name, (_, _, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _delegate(name: str, argv: list[str]) -> int:
    module_name, function, _ = DELEGATED[name]
    function_impl: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), function)
    return int(function_impl(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `smolvlm` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        rest = [a for a in argv if a != "--debug"]
        if rest and rest[0] in DELEGATED:
            return _delegate(rest[0], rest[1:])
        args = build_parser().parse_args(rest)  # --debug may stand anywhere
        if getattr(args, "batch_size", 1) < 1:
            raise SmolVLMError("--batch-size must be at least 1")
        return args.func(args)
    except (SmolVLMError, OSError) as e:  # OSError: a full disk, a missing or unwritable folder, named by the OS
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
