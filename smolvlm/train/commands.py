"""Command-line entry points for training and evaluation: `smolvlm train | merge-lora | eval | data`.

Each `*_main(argv)` parses its own arguments, prints SmolVLMError as one line on stderr and returns an exit code.
`python -m smolvlm.train.commands train ...` runs them without the main CLI (torchrun uses this form).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from smolvlm.errors import SmolVLMError

if TYPE_CHECKING:  # the trainer imports torch; commands import it only when they run
    from smolvlm.train.trainer import TrainConfig

EXIT_ERROR = 2


def _guarded(run: Callable[[], int]) -> int:
    try:
        return run()
    except SmolVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# ----------------------------------------------------------------------------------------------- train

def train_parser() -> argparse.ArgumentParser:
    """`smolvlm train`: one --flag per TrainConfig field, plus --config FILE.json for a stage preset."""
    from smolvlm.train.trainer import OBJECTIVES, PARTS, POLICIES, TrainConfig

    parser = argparse.ArgumentParser(prog="smolvlm train", description="Fine-tune a SmolVLM checkpoint.")
    parser.add_argument("--config", help="JSON file of TrainConfig fields (a stage); flags override it")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            choices = POLICIES if f.name in PARTS else OBJECTIVES if f.name == "objective" else None
            parser.add_argument(flag, type=kind, default=None, choices=choices, help=f"default: {f.default!r}")
    return parser


def train_config(argv: Sequence[str] | None) -> "TrainConfig":
    """Parse `smolvlm train` arguments into a TrainConfig (file values first, then flags)."""
    from smolvlm.errors import ConfigError
    from smolvlm.train.trainer import TrainConfig

    args = vars(train_parser().parse_args(argv))
    values = {}
    config_file = args.pop("config")
    if config_file:
        path = Path(config_file)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the stage config ({e})") from e
        unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise ConfigError(f"{path}: unknown fields {sorted(unknown)}")
    values.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**values)


def train_main(argv: Sequence[str] | None = None) -> int:
    """`smolvlm train --model DIR --data FILE --out DIR [...]`."""
    _setup_logging()

    def run() -> int:
        from smolvlm.train.trainer import train

        metrics = train(train_config(argv))
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
            print(json.dumps({k: v for k, v in metrics.items() if k in ("step", "loss", "eval", "skipped")}))
        return 0

    return _guarded(run)


# ----------------------------------------------------------------------------------------------- merge-lora

def merge_lora_main(argv: Sequence[str] | None = None) -> int:
    """`smolvlm merge-lora --base DIR --adapter DIR --out DIR`: write a merged Hugging Face folder."""
    parser = argparse.ArgumentParser(prog="smolvlm merge-lora", description="Merge a LoRA adapter into its base.")
    parser.add_argument("--base", required=True, help="base checkpoint folder")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter folder")
    parser.add_argument("--out", required=True, help="output folder (HF format)")
    args = parser.parse_args(argv)

    def run() -> int:
        import shutil

        from smolvlm.processing import Processor
        from smolvlm.train.lora import load_adapter, merge_lora
        from smolvlm.weights.checkpoint import load_smolvlm, save_smolvlm

        model = load_smolvlm(args.base)
        load_adapter(model, args.adapter)
        out = save_smolvlm(merge_lora(model), args.out)
        Processor.from_pretrained(args.base).save(out)
        if (Path(args.base) / "generation_config.json").is_file():
            shutil.copy(Path(args.base) / "generation_config.json", out / "generation_config.json")
        print(f"wrote merged model to {out}")
        return 0

    return _guarded(run)


# ----------------------------------------------------------------------------------------------- eval

def eval_main(argv: Sequence[str] | None = None) -> int:
    """`smolvlm eval -m MODEL --data SET.jsonl [--out FILE] [--json] [--limit N] [--batch-size B]`."""
    parser = argparse.ArgumentParser(prog="smolvlm eval", description="Score a model on a JSONL eval set.")
    parser.add_argument("-m", "--model", required=True, help="model folder, hub id or demo")
    parser.add_argument("--data", required=True, help="eval JSONL: conversations ending in the reference answer")
    parser.add_argument("--out", help="write the table and every prediction as JSON here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N samples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--strict", action="store_true", help="fail on a bad line instead of skipping it")
    args = parser.parse_args(argv)

    def run() -> int:
        from smolvlm.api import load
        from smolvlm.eval.tasks import evaluate_file, write_report

        vlm = load(args.model, device=args.device)
        report = evaluate_file(vlm, args.data, args.limit, args.batch_size, args.max_new_tokens, args.strict,
                               progress=not args.json)
        if args.out:
            write_report(report, args.out)
        if args.json:
            print(json.dumps({"table": report.table, "skipped": report.skipped, "out": args.out}))
        else:
            print(report.format_table())
            if report.skipped:
                print(f"({report.skipped} bad lines skipped)")
        return 0

    return _guarded(run)


# ----------------------------------------------------------------------------------------------- data

def data_main(argv: Sequence[str] | None = None) -> int:
    """`smolvlm data synth ...` (synthetic dataset), `smolvlm data chat ...` (self-distilled plain-text samples) or
    `smolvlm data check --model DIR --data FILE`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synth"]:
        from smolvlm.train.synthetic import main as synth_main

        return synth_main(argv[1:])
    if argv[:1] == ["chat"]:
        from smolvlm.train.self_distill import main as chat_main

        return chat_main(argv[1:])
    parser = argparse.ArgumentParser(prog="smolvlm data check", description="Encode every sample; report bad ones.")
    parser.add_argument("command", choices=["check"],
                        help="synth or chat (see `smolvlm data synth -h`, `smolvlm data chat -h`) or check")
    parser.add_argument("--model", required=True, help="checkpoint whose processor encodes the data")
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--strict", action="store_true", help="exit with an error at the first bad sample")
    args = parser.parse_args(argv)
    _setup_logging()

    def run() -> int:
        from smolvlm.processing import Processor
        from smolvlm.train.data import BadData, Collator, load_samples

        bad = BadData(args.strict)
        samples = Collator(Processor.from_pretrained(args.model), args.max_length, bad).scan(
            load_samples(args.data, bad))
        print(json.dumps({"usable": len(samples), "skipped": bad.total, "reasons": bad.counts}))
        return 0

    return _guarded(run)


COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "train": train_main, "merge-lora": merge_lora_main, "eval": eval_main, "data": data_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch `python -m smolvlm.train.commands {train,merge-lora,eval,data} ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m smolvlm.train.commands {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return EXIT_ERROR
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
