"""`smolvlm train --objective scene`: teach a vision tower what is where, from the synthetic scenes' own metadata.

A vision tower trained from scratch only through a frozen language model's answer loss gets a weak, noisy signal
(one short answer per picture) and tends to collapse to image-independent features. Synthetic pictures come with
their scene, so every patch has an exact label (`scene_labels.py`). This stage trains the vision tower with three
small linear heads on the patch features: the patch's class histogram (soft cross-entropy), the box of the thing
covering it (L1) and whether a countable thing's centre lies in it (binary cross-entropy).

When the connector trains too (`--connector full`), each image token is also pulled towards words of the language
model's vocabulary, so the picture reads like text: the token at a red circle's centre says " red" + " circle", a
character says itself, the rest " background" (see `scene_labels.token_words`). Learning that alignment through the
language model's answer loss alone took far more steps than a CPU run affords.

The heads are thrown away; OUT/final is the input checkpoint with the new vision tower (and connector), ready for a
language-model stage (`--objective lm`) on the answers.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smolvlm.errors import ConfigError, DataError
from smolvlm.processing import Processor
from smolvlm.processing.image import batch_tiles, split_image
from smolvlm.train.prefetch import prefetched
from smolvlm.train.scene_labels import (
    N_CLASSES, NO_WORD, SLACK_CHOICES, instance_map, patch_targets, slack_tokens, token_word_list, token_words,
)
from smolvlm.train.synthetic import render_scene
from smolvlm.weights.checkpoint import load_smolvlm

ALIGN_CE_WEIGHT = 1.0  # next to the relative squared error of the image tokens against their words' embeddings
BACKGROUND_WEIGHT = 0.1  # "background" is ~90% of the tokens; unweighted, the few words that matter went unlearnt
BOX_WEIGHT = 5.0  # box coordinates are in [0, 1]: L1 errors are small next to the class cross-entropy
CENTRE_POS_WEIGHT = 10.0  # about one patch in ten holds a centre


class SceneHeads(nn.Module):
    """Linear heads on patch features: class logits, box (sigmoid, [0, 1]) and centre logit."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.classes = nn.Linear(hidden_size, N_CLASSES)
        self.box = nn.Linear(hidden_size, 4)
        self.centre = nn.Linear(hidden_size, 1)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, P, D) -> class logits (N, P, C), boxes (N, P, 4), centre logits (N, P)."""
        return self.classes(patches), self.box(patches).sigmoid(), self.centre(patches).squeeze(-1)


def load_scenes(path: str | Path) -> list[dict[str, Any]]:
    """Every distinct scene in a synthetic JSONL (`meta.images` of each line), in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; the scene objective reads a JSONL written by `smolvlm data synth`")
    scenes, seen = [], set()
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                images = json.loads(line).get("meta", {}).get("images")
            except (json.JSONDecodeError, AttributeError) as e:
                raise DataError(f"{path}:{number}: not a JSON object ({e})") from e
            if not isinstance(images, list):
                raise DataError(f"{path}:{number}: no meta.images scenes; the scene objective needs synthetic data "
                                "(`smolvlm data synth`)")
            for scene in images:
                key = json.dumps(scene, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    scenes.append(scene)
    if not scenes:
        raise DataError(f"{path}: no scenes")
    return scenes


class SceneBatches:
    """Rendered, normalised pictures and stacked patch targets for lists of scenes."""

    def __init__(self, processor: Processor, patch_size: int, scale_factor: int, centre_slack: float = 0.0,
                 where: bool = False) -> None:
        if processor.image_config is None:
            raise ConfigError("the scene objective needs a checkpoint with an image processor")
        self.config = processor.image_config
        self.patch_size = patch_size
        self.token_size = patch_size * scale_factor  # pixels per image token's region
        self.centre_slack = centre_slack  # > 0: also each scene's `slack_tokens`
        self.where = where  # a shape's token also names its centre's cell (`token_words`)

    def __call__(self, scenes: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """pixel_values (N, 3, H, W); patch targets classes (N, P, C), boxes (N, P, 4), has_box, centres (N, P); the
        image tokens' word ids (N, T, 2), (N, T, 4) with `where`; with a centre slack, the `slack_tokens` (N, K, 4),
        -1 padded."""
        tiles, targets, words, slack = [], [], [], []
        for scene in scenes:
            image = render_scene(scene)
            cut = split_image(image, self.config)
            if len(cut.tiles) != 1 or cut.tiles[0].shape[:2] != (image.height, image.width):
                raise ConfigError(f"the scene objective needs each picture to be one unresized tile; this "
                                  f"checkpoint turns a {image.width}x{image.height} picture into {len(cut.tiles)} "
                                  f"tile(s) of {cut.tiles[0].shape[1]}x{cut.tiles[0].shape[0]}")
            tiles.append([cut])
            drawn = instance_map(scene)  # drawn once, summarised twice
            targets.append(patch_targets(scene, self.patch_size, drawn))
            words.append(token_words(scene, self.token_size, drawn, self.where))
            if self.centre_slack > 0:
                slack.append(slack_tokens(scene, self.token_size, self.centre_slack, drawn))
        pixel_values, _ = batch_tiles(tiles, self.config)  # (N, 1, 3, H, W)

        def stack(field: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([getattr(t, field) for t in targets]))

        batch = {"pixel_values": pixel_values[:, 0], "classes": stack("classes"), "boxes": stack("boxes"),
                 "has_box": stack("has_box"), "centres": stack("centres"), "words": torch.from_numpy(np.stack(words))}
        if self.centre_slack > 0:
            padded = np.full((len(slack), max(1, max(len(s) for s in slack)), SLACK_CHOICES), -1, dtype=np.int64)
            for n, rows in enumerate(slack):
                padded[n, : len(rows)] = rows
            batch["slack"] = torch.from_numpy(padded)
        return batch


def word_embeddings(model: nn.Module, processor: Processor, where: bool = False) -> torch.Tensor:
    """(N_WORDS, D): the input embedding of each of `token_word_list(where)`'s words (SmolLM2 has each as one token;
    a tokenizer that splits a word gets the mean of its pieces)."""
    table = model.text_model.embed_tokens.weight.detach()  # (V, D)
    rows = []
    for word in token_word_list(where):
        pieces = processor.tokenizer.encode(word, add_special_tokens=False)
        rows.append(table[torch.tensor(pieces, device=table.device)].mean(0))
    return torch.stack(rows)  # (W, D)


def word_ce(log_probs: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (...) of log-probabilities over the words (..., W) against an even split over each token's
    words (..., K), NO_WORD padded."""
    present = words != NO_WORD  # (..., K)
    share = present.float() / present.sum(-1, keepdim=True)  # 1 for one word, 1/2 each for two, ...
    return -(share * log_probs.gather(-1, words.clamp(min=0))).sum(-1)


@torch.no_grad()
def resolve_slack(log_probs: torch.Tensor, words: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """The token words (N, T, K) with each `slack_tokens` thing (slack (N, K, 4), -1 padded) moved to the one of
    its tokens whose cross-entropy gains least by saying it instead of " background" (log_probs (N, T, W))."""
    rows = torch.arange(len(words), device=words.device)[:, None, None]  # (N, 1, 1)
    tokens = slack.clamp(min=0)  # (N, K, 4)
    said = words[rows[..., 0], tokens[..., 0]]  # (N, K, Kw): the words of each thing
    background = torch.full_like(said[0, 0], NO_WORD)
    background[0] = 0
    lp = log_probs[rows, tokens]  # (N, K, 4, W)
    cost = word_ce(lp, said[:, :, None].expand(-1, -1, SLACK_CHOICES, -1)) + lp[..., 0]  # (N, K, 4); word 0: background
    best = cost.masked_fill(slack < 0, float("inf")).argmin(-1, keepdim=True)  # (N, K, 1)
    chosen = tokens.gather(-1, best)[..., 0]  # (N, K)
    real = slack[..., 0] >= 0  # (N, K)
    n = rows[..., 0].expand_as(chosen)[real]
    words = words.clone()
    words[n, tokens[..., 0][real]] = background
    words[n, chosen[real]] = said[real]
    return words


def align_losses(tokens: torch.Tensor, words: torch.Tensor, table: torch.Tensor,
                 slack: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Image tokens (N, T, D) against their words (N, T, K) of `token_words`: relative squared error to the sum of
    the words' embeddings; cross-entropy of the tokens' dot products with every word against an even split over
    the token's words (so each token is nearest its own), background down-weighted since it is most tokens; and
    the share of tokens whose nearest words are exactly theirs, overall and among the tokens that say something.
    With `slack` (`slack_tokens`, (N, K, 4)) a thing near a token border is said where `resolve_slack` puts it."""
    tokens = tokens.float()
    log_probs = (tokens @ table.T).log_softmax(-1)  # (N, T, W)
    if slack is not None:
        words = resolve_slack(log_probs, words, slack)
    present = words != NO_WORD  # (N, T, K)
    targets = (table[words.clamp(min=0)] * present[..., None]).sum(-2)  # (N, T, D)
    ce = word_ce(log_probs, words)  # (N, T)
    first = words[..., 0]
    weight = torch.where(first == 0, BACKGROUND_WEIGHT, 1.0)
    k = words.shape[-1]
    top = log_probs.topk(k, dim=-1).indices  # (N, T, K)
    among = torch.arange(k, device=words.device) < present.sum(-1, keepdim=True)  # (N, T, K): a token's top n
    found = ((words[..., :, None] == top[..., None, :]) & among[..., None, :]).any(-1)  # (N, T, K)
    right = (found | ~present).all(-1)  # (N, T): its n nearest words are exactly its n words
    said = first != 0
    return {"align_mse": (tokens - targets).pow(2).mean() / targets.pow(2).mean(),
            "align_ce": (ce * weight).sum() / weight.sum(),
            "align_acc": right.float().mean(),
            "word_acc": right[said].float().sum() / said.sum().clamp(min=1)}


def scene_losses(heads: SceneHeads, patches: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The three patch losses (means over patches) and the patch accuracy of the dominant class."""
    class_logits, boxes, centre_logits = heads(patches)
    log_probs = class_logits.float().log_softmax(-1)  # (N, P, C)
    classes = batch["classes"]
    has_box = batch["has_box"].float()  # (N, P)
    box_l1 = ((boxes.float() - batch["boxes"]).abs().sum(-1) * has_box).sum() / has_box.sum().clamp(min=1)
    centre = F.binary_cross_entropy_with_logits(centre_logits.float(), batch["centres"],
                                                pos_weight=centre_logits.new_tensor(CENTRE_POS_WEIGHT))
    cls = -(classes * log_probs).sum(-1).mean()
    accuracy = (log_probs.argmax(-1) == classes.argmax(-1)).float().mean()
    return {"loss": cls + BOX_WEIGHT * box_l1 + centre, "class_ce": cls, "box_l1": box_l1, "centre_bce": centre,
            "class_acc": accuracy}


class Alignment:
    """The connector and the word embeddings its image tokens are pulled towards."""

    def __init__(self, model: nn.Module, processor: Processor, where: bool = False) -> None:
        self.connector = model.connector
        self.words = word_embeddings(model, processor, where)  # (W, D)

    def losses(self, patches: torch.Tensor, words: torch.Tensor,
               slack: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Patch features (N, P, Dv), token word ids (N, T, K) and optional `slack_tokens` (N, K, 4) -> the
        alignment losses and accuracy."""
        return align_losses(self.connector(patches), words, self.words, slack)


def scene_stage_losses(vision: nn.Module, heads: SceneHeads, align: Alignment | None,
                       batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Patch losses, plus the alignment loss of the image tokens when the connector trains."""
    patches = vision(batch["pixel_values"])  # (N, P, Dv)
    losses = scene_losses(heads, patches, batch)
    if align is not None:
        aligned = align.losses(patches, batch["words"], batch.get("slack"))
        losses.update(aligned)
        losses["loss"] = losses["loss"] + aligned["align_mse"] + ALIGN_CE_WEIGHT * aligned["align_ce"]
    return losses


def train_scene(config: Any) -> dict[str, Any]:
    """Run the scene objective described by a TrainConfig; writes OUT/final and OUT/log.jsonl."""
    from smolvlm.api import resolve_device
    from smolvlm.train.trainer import (
        compile_layers,
        forward_precision,
        lr_factor,
        save_run_folder,
    )

    if config.vision != "full":
        raise ConfigError("--objective scene trains the whole vision tower: set --vision full")
    if config.connector not in ("frozen", "full"):
        raise ConfigError("--objective scene aligns the whole connector or leaves it: set --connector full or frozen")
    if config.resume or config.fsdp or config.teacher or config.continue_adapter or config.save_every:
        raise ConfigError("--objective scene is a short single-process stage that writes OUT/final only: it takes "
                          "no --resume, --save-every, --fsdp, --teacher or --continue-adapter")
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    processor = Processor.from_pretrained(config.model)
    model = load_smolvlm(config.model, device=device, dtype=torch.float32)
    if config.compile:
        compile_layers(model)
    vision = model.vision_model
    heads = SceneHeads(model.config.vision.hidden_size).to(device)
    params = [p for p in vision.parameters()] + list(heads.parameters())
    align = None
    if config.connector != "frozen":
        params += list(model.connector.parameters())
        align = Alignment(model, processor, config.where_words)
    lr = config.vision_lr or config.lr
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay,
                                  betas=(config.beta1, config.beta2))
    scenes = load_scenes(config.data)
    eval_scenes = load_scenes(config.eval_data) if config.eval_data else []
    make_batch = SceneBatches(processor, model.config.vision.patch_size, model.config.scale_factor,
                              config.centre_slack, config.where_words)
    order = random.Random(config.seed)
    epoch: list[int] = []

    def next_picks() -> list[int]:
        picks = []
        for _ in range(config.batch_size):
            if not epoch:
                epoch.extend(order.sample(range(len(scenes)), len(scenes)))
            picks.append(epoch.pop())
        return picks

    picks = [next_picks() for _ in range(config.max_steps)]  # the scenes of every step, fixed by the seed

    def step_batch(step: int) -> dict[str, torch.Tensor]:
        return make_batch([scenes[i] for i in picks[step]])

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {}
    start = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=config.max_steps, desc="train scene", unit="step", disable=not config.progress,
               dynamic_ncols=True)
    vision.train()
    batches = prefetched(step_batch, range(config.max_steps), config.data_workers)
    with (out / "log.jsonl").open("a", encoding="utf-8") as log_file:
        for step, cpu_batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in cpu_batch.items()}
            factor = lr_factor(step, config.warmup_steps, config.max_steps, config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            with forward_precision(config.precision, device, auto_bf16_on_gpu=False):  # fp32 unless asked
                losses = scene_stage_losses(vision, heads, align, batch)
            losses["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            metrics = {"step": step + 1, "lr": lr * factor, "grad_norm": float(grad_norm), "elapsed_s": elapsed,
                       "pictures_per_s": (step + 1) * config.batch_size / elapsed,
                       **{k: float(v.detach()) for k, v in losses.items()}}
            if not math.isfinite(metrics["loss"]):
                raise DataError(f"scene objective: the loss became {metrics['loss']} at step {step + 1}; "
                                "lower --lr")
            if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps:
                log_file.write(json.dumps(metrics) + "\n")
                log_file.flush()
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['class_acc']:.3f}",
                            **({"words": f"{metrics['word_acc']:.3f}"} if "word_acc" in metrics else {}))
            bar.update(1)
        bar.close()
        if eval_scenes:
            metrics["eval"] = evaluate_scenes(vision, heads, align, make_batch, eval_scenes, config.eval_batch_size,
                                              device)
            log_file.write(json.dumps({"step": config.max_steps, "eval": metrics["eval"]}) + "\n")
    vision.eval()
    save_run_folder(model, processor, config.model, out / "final")
    return metrics


@torch.no_grad()
def evaluate_scenes(vision: nn.Module, heads: SceneHeads, align: "Alignment | None", make_batch: SceneBatches,
                    scenes: list[dict[str, Any]], batch_size: int, device: torch.device) -> dict[str, float]:
    """Mean losses and patch accuracy over held-out scenes."""
    was_training = vision.training
    vision.eval()
    totals: dict[str, float] = {}
    for i in range(0, len(scenes), batch_size):
        chunk = scenes[i : i + batch_size]
        batch = {k: v.to(device) for k, v in make_batch(chunk).items()}
        for key, value in scene_stage_losses(vision, heads, align, batch).items():
            totals[key] = totals.get(key, 0.0) + float(value) * len(chunk)
    vision.train(was_training)
    return {k: v / len(scenes) for k, v in totals.items()}

