"""Where the demo model's answers go wrong: its image tokens, or the language model reading them.

    python scripts/demo_diagnostics.py collisions [--signs monospace] [--n 300]
        characters of synthetic signs that get no image token of their own (32-px tokens, 256-px pictures)
    python scripts/demo_diagnostics.py tokens -m demo --data eval.jsonl [--where]
        share of a checkpoint's image tokens whose nearest words are their stage-1 words, per kind of thing
    python scripts/demo_diagnostics.py count-tokens -m demo --data eval.jsonl
        the counting questions answered from the image tokens alone (how many tokens name the asked shape), and
        how often a shape is named at the token holding its centre, near a token border and away from it
    python scripts/demo_diagnostics.py image-tokens -m demo examples/shapes.png
        one picture's image tokens (its global view) that do not say background: row, column, two nearest words
    python scripts/demo_diagnostics.py oracle -m BASE --train train.jsonl --eval eval.jsonl --task ocr
        the language model's side alone: LoRA trained on exact image tokens (each the word embeddings of what its
        region shows, as `--objective scene` targets them), then held-out exact match every 50 steps
    python scripts/demo_diagnostics.py breakdown --report report.json --data eval.jsonl
        a `smolvlm eval --out` report split further: spatial by axis, counting by the true count, the largest bar by
        where the top two are, grounding by the 16-px column and row of the shape (the answer's box centred there)
    python scripts/demo_diagnostics.py snap-ceiling --data eval.jsonl --cell 16
        the share of grounding questions a box snapped to its centre's cell (`oracle --snap`) answers right

`oracle` layouts add words to each shape's token: `plain` colour + shape, `col` + its column digit, `ord` + its
ordinal among the shapes of its kind in reading order, `half` + which half of its token the shape's centre lies in
across (" west"/" east") and down (" north"/" south"), `grid` + the 16-px column and row of its centre (" zero" to
" fifteen", " first" to " sixteenth": what `smolvlm train --objective scene --where-words` teaches a tower to say);
`--task grounding` scores boxes by IoU >= 0.5, the other tasks token for token. `--snap CELL` trains grounding on
snapped boxes (`synthetic.snapped_box`: a square centred on the CELL-px cell holding the shape's centre), so that an
answer is a function of where that cell is (location bins, as Pix2Seq's): the language model then has only to read the
cell off the tokens. `--save DIR` writes the LoRA adapter at every report and `--adapter DIR` trains on from one (an
earlier run's, or the demo's `smolvlm/assets/demo`), so that a run longer than a sitting can go on later. Scripts' own
figures go to stdout; `--json` for one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from smolvlm.api import load
from smolvlm.errors import SmolVLMError
from smolvlm.eval.metrics import grounding_hit, parse_box, score
from smolvlm.train.data import Collator, Sample, load_jsonl
from smolvlm.train.lora import LoRAConfig, apply_lora, load_adapter, save_adapter
from smolvlm.train.scene_labels import (
    BAR_CLASSES, CHAR_CLASSES, CHARACTERS, COLOUR_NAMES, NO_WORD, SHAPE_CLASSES, SIGN_CLASS, character_word,
    WHERE_CELLS, instance_map, token_word_list, token_words, where_cell, where_words,
)
from smolvlm.train.scene_pretrain import SceneBatches, load_scenes, word_embeddings
from smolvlm.train.synthetic import (
    SHAPES, SIGN_LAYOUTS, grounded_box, snapped_grounding, snapped_target, split_sample,
)

GRID = 8  # the demo's image tokens per side (256-px picture, 32-px tokens)
HALF_WORDS = ((" west", " east"), (" north", " south"))  # `half` layout; words no synthetic question uses


def collisions(signs: str, n: int) -> dict[str, float]:
    """Characters and whole signs that `token_words` cannot say, over n train-split OCR scenes."""
    names = token_word_list()
    lost = total = unreadable = 0
    for index in range(n):
        _, _, answer, meta = split_sample("ocr", 0, "train", index, 256, signs)
        words = token_words(meta["images"][0], 256 // GRID)
        said = "".join(names[w].strip() for w in words[:, 0] if w > 0)
        wanted = answer.replace(" ", "")
        total += len(wanted)
        lost += len(wanted) - len(said)
        unreadable += said != wanted
    return {"signs": n, "characters_without_a_token": lost / total, "signs_unreadable": unreadable / n}


def word_scores(m: torch.nn.Module, table: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, T, W): the dot product of each image token of pictures (N, 3, H, W) with each word `table` (W, D) embeds
    (`word_embeddings`)."""
    with torch.no_grad():
        tokens = m.connector(m.vision_model(pixel_values)).float()  # (N, T, D)
    return tokens @ table.T


def nearest_words(m: torch.nn.Module, table: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, T, 2): the two nearest words to each image token (`word_scores`)."""
    return word_scores(m, table, pixel_values).topk(2, dim=-1).indices


def token_scores(model: str, scenes: list[dict], where: bool = False
                 ) -> Iterator[tuple[dict, torch.Tensor, torch.Tensor]]:
    """Each scene with its image tokens' dot products with every word of `token_word_list(where)` (T, W) and the
    words the scene objective teaches them (T, 2), (T, 4) with `where`."""
    vlm = load(model, device="cpu", dtype=torch.float32)
    m = vlm.model
    make_batch = SceneBatches(vlm.processor, m.config.vision.patch_size, m.config.scale_factor, where=where)
    table = word_embeddings(m, vlm.processor, where).float()  # (W, D)
    for i in range(0, len(scenes), 25):
        chunk = scenes[i : i + 25]
        batch = make_batch(chunk)
        scores = word_scores(m, table, batch["pixel_values"])  # (N, T, W)
        for n, scene in enumerate(chunk):
            yield scene, scores[n], batch["words"][n]


def token_top2(model: str, scenes: list[dict]) -> Iterator[tuple[dict, torch.Tensor, torch.Tensor]]:
    """Each scene with its image tokens' two nearest words (T, 2) and the words stage 1 taught them (T, 2)."""
    for scene, scores, words in token_scores(model, scenes):
        yield scene, scores.topk(2, dim=-1).indices, words


def token_accuracy(model: str, data: str, limit: int, where: bool = False) -> dict[str, dict[str, float]]:
    """Per kind (background, shape, bar, chart character, sign character by font): how often a token's nearest
    words are exactly its stage-1 words. With `where` (a `--where-words` tower), a shape's colour and shape are its
    two nearest words but for the where words, and its column and row are each the nearest of their axis' words."""
    names = token_word_list()
    plain = len(names)  # where words come after these
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for scene, scores, words in token_scores(model, load_scenes(data)[:limit], where):
        top2 = scores[:, :plain].topk(2, dim=-1).indices  # (T, 2)
        for t, (first, second, *place) in enumerate(words.tolist()):
            if first == 0:
                said = {"background": scores[t].argmax() == 0}
            elif second == NO_WORD:
                kind = "character, " + (f"sign {scene['sign']['style']}" if "sign" in scene else "chart")
                said = {kind: top2[t, 0] == first}
            elif names[second] == " bar":
                said = {"bar": set(top2[t].tolist()) == {first, second}}
            else:
                said = {"shape": set(top2[t].tolist()) == {first, second}}
                if where:
                    columns, rows = scores[t, plain : plain + WHERE_CELLS], scores[t, plain + WHERE_CELLS :]
                    column, row = plain + int(columns.argmax()), plain + WHERE_CELLS + int(rows.argmax())
                    said |= {"shape: column": column == place[0], "shape: row": row == place[1],
                             "shape: column and row": (column, row) == tuple(place)}
            for kind, right in said.items():
                counts[kind][0] += int(right)
                counts[kind][1] += 1
    return {kind: {"right": r / total, "n": total} for kind, (r, total) in sorted(counts.items())}


def image_tokens(model: str, image: str) -> list[list[list[str]]]:
    """The two nearest words of every image token of a picture's global view, as rows of the token grid."""
    vlm = load(model, device="cpu", dtype=torch.float32)
    content = [{"type": "image", "image": image}, {"type": "text", "text": "?"}]
    batch = vlm.prepare([[{"role": "user", "content": content}]])
    tiles = batch.pixel_values[0][batch.pixel_attention_mask[0].flatten(1).any(1)]  # (tiles, 3, H, W), global last
    names = token_word_list()
    table = word_embeddings(vlm.model, vlm.processor).float()  # (W, D)
    top2 = nearest_words(vlm.model, table, tiles[-1:])[0].tolist()  # (T, 2)
    side = math.isqrt(len(top2))
    return [[[names[w] for w in top2[r * side + c]] for c in range(side)] for r in range(side)]


def count_from_tokens(model: str, data: str) -> dict[str, float]:
    """The counting questions of a synthetic JSONL answered from the image tokens alone: the count is the tokens
    whose nearest word is not " background" and whose two nearest words name the asked shape. Also, by the
    distance of a counted shape's centre to its token's border (under 2 px: near), how often the shape is named at
    the token holding its centre, and how often by exactly one, two or more, or none of the tokens its box covers."""
    metas = [meta for meta in metas_by_id(data).values() if meta.get("task") == "count"]
    if not metas:
        raise SystemExit(f"{data}: no counting questions; write some with `smolvlm data synth --tasks count`")
    names = token_word_list()
    errors, shapes = [], defaultdict(list)  # near / far: (named at its centre, tokens naming it) of each shape
    for meta, (scene, top2, _) in zip(metas, token_top2(model, [meta["images"][0] for meta in metas])):
        shape = names.index(f" {meta['shape']}")
        says = [int(t[0] != 0 and shape in t) for t in top2.tolist()]  # (T,) token names the asked shape
        counted = [o["box"] for o in scene["objects"] if o["shape"] == meta["shape"]]
        errors.append(sum(says) - len(counted))
        cell = scene["size"][0] / GRID
        for x0, y0, x1, y1 in counted:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            edge = min(cx % cell, cell - cx % cell, cy % cell, cell - cy % cell)
            covered = sum(says[r * GRID + c] for r in range(int(y0 // cell), int((y1 - 1) // cell) + 1)
                          for c in range(int(x0 // cell), int((x1 - 1) // cell) + 1))
            shapes["near" if edge < 2 else "far"].append((says[int(cy // cell) * GRID + int(cx // cell)], covered))
    n = len(errors)
    figures = {"right": errors.count(0) / n, "too many": sum(e > 0 for e in errors) / n,
               "too few": sum(e < 0 for e in errors) / n, "n": n,
               "shapes < 2 px from a border": len(shapes["near"]) / max(1, len(shapes["near"]) + len(shapes["far"]))}
    for where, text in (("near", "centre < 2 px from a token border"), ("far", "centre >= 2 px from it")):
        total = max(1, len(shapes[where]))
        figures[f"{text}: named at centre"] = sum(centre for centre, _ in shapes[where]) / total
        figures[f"{text}: named once"] = sum(times == 1 for _, times in shapes[where]) / total
        figures[f"{text}: named twice or more"] = sum(times > 1 for _, times in shapes[where]) / total
        figures[f"{text}: named nowhere"] = sum(times == 0 for _, times in shapes[where]) / total
    return figures


def metas_by_id(path: str) -> dict[str, dict]:
    """The `meta` of every line of a synthetic JSONL, by sample id."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return {record["id"]: record["meta"] for record in map(json.loads, filter(str.strip, lines))}


def snap_ceiling(data_path: str, cell: int) -> dict[str, float]:
    """The share of a synthetic JSONL's grounding questions that their snapped answer gets right (IoU >= 0.5)."""
    hits = [float(grounding_hit(snapped_target(meta, cell), meta["box"]))
            for meta in metas_by_id(data_path).values() if meta.get("task") == "grounding"]
    if not hits:
        raise SmolVLMError(f"{data_path} has no grounding questions; write some with `smolvlm data synth --tasks "
                           "grounding`")
    return {"right": sum(hits) / len(hits), "n": len(hits)}


def task_metas(path: str, task: str) -> list[tuple[Sample, dict]]:
    """(sample, meta) of each question of one task in a synthetic JSONL."""
    metas = metas_by_id(path)
    return [(s, metas[s.id]) for s in load_jsonl(path) if s.task == task]


def with_answer(sample: Sample, answer: str) -> Sample:
    """The sample with its assistant answer replaced."""
    def fetch() -> list[dict]:
        messages = sample.conversation()
        return [messages[0], {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return replace(sample, messages=None, fetch=fetch)


class OracleTokens:
    """Exact image tokens of a scene: the embeddings of the words its regions show, laid out as in `--objective
    scene` (a thing at the token holding its centre; characters one token each, in reading order)."""

    def __init__(self, embeddings: torch.Tensor, encode, layout: str) -> None:
        self.table, self.encode, self.layout = embeddings, encode, layout

    def word(self, text: str) -> torch.Tensor:
        """The summed embeddings of a text's tokens (one token for every word used here)."""
        return self.table[torch.tensor(self.encode(text))].sum(0)

    def __call__(self, scene: dict) -> torch.Tensor:
        """(GRID * GRID, D) tokens of one scene."""
        _, instances = instance_map(scene)
        tokens = [self.word(" background")] * (GRID * GRID)
        cell = 256 // GRID
        seen: dict[str, int] = defaultdict(int)
        placed = []
        for inst in instances:
            x, y = inst.centre()
            row, col = min(int(y) // cell, GRID - 1), min(int(x) // cell, GRID - 1)
            across, down = int(x) * 2 // cell, int(y) * 2 // cell  # the centre's half-token column and row
            placed.append((row * GRID + col, col, across, down, inst))
        taken: set[int] = set()
        for at, col, across, down, inst in sorted(placed, key=lambda p: p[0]):
            if CHAR_CLASSES <= inst.label < BAR_CLASSES:  # token_words' rule, but a character never loses its token
                while at in taken and at + 1 < GRID * GRID:
                    at += 1
                vector = self.word(character_word(CHARACTERS[inst.label - CHAR_CLASSES]))
            elif SHAPE_CLASSES <= inst.label < SIGN_CLASS and inst.countable:
                shape, colour = divmod(inst.label - SHAPE_CLASSES, len(COLOUR_NAMES))
                seen[SHAPES[shape]] += 1
                vector = self.word(f" {COLOUR_NAMES[colour]}") + self.word(f" {SHAPES[shape]}")
                if self.layout == "col":
                    vector = vector + self.word(str(col))
                elif self.layout == "ord":
                    vector = vector + self.word(str(seen[SHAPES[shape]]))
                elif self.layout == "half":  # which half of its token the centre lies in, across and down
                    vector = vector + self.word(HALF_WORDS[0][across % 2]) + self.word(HALF_WORDS[1][down % 2])
                elif self.layout == "grid":  # where the centre is, to half a token: `--where-words`' words
                    column, row = where_words(*inst.centre(), scene["size"])
                    vector = vector + self.word(column) + self.word(row)
            else:
                continue
            taken.add(at)
            tokens[at] = vector
        return torch.stack(tokens)


def oracle(model: str, train_path: str, eval_path: str, task: str, layout: str, steps: int, lr: float,
           batch_size: int, seed: int, n_eval: int = 40, device: str = "cpu", every: int = 50, snap: int = 0,
           adapter: str | None = None, save: str | None = None) -> list[dict[str, float]]:
    """Train LoRA (r 16) on exact image tokens for one task; held-out exact match and the mean training loss every
    `every` steps. `snap` > 0: grounding trains on boxes snapped to `snap`-px cells (scored on the true ones).
    `adapter`: train on from a saved adapter (an earlier run's `save`, or the demo's) instead of a fresh one; `save`:
    write the adapter there at every report, so that a long run can go on later from it."""
    if snap and task != "grounding":
        raise SmolVLMError("--snap is for --task grounding: it snaps the training boxes")
    if snap < 0:
        raise SmolVLMError(f"--snap is a cell side in pixels (0: no snapping), not {snap}")
    torch.manual_seed(seed)
    vlm = load(model, device=device, dtype=torch.float32)
    m, processor = vlm.model, vlm.processor
    tokenizer = processor.tokenizer
    oracle_tokens = OracleTokens(m.text_model.embed_tokens.weight.detach().clone(),
                                 lambda text: tokenizer.encode(text, add_special_tokens=False), layout)

    train_set = [(with_answer(s, snapped_grounding(meta, snap)) if snap else s, meta["images"][0])
                 for s, meta in task_metas(train_path, task)]
    eval_set = [(s, meta["images"][0]) for s, meta in task_metas(eval_path, task)[:n_eval]]
    collator = Collator(processor)
    for p in m.parameters():
        p.requires_grad_(False)
    if adapter:
        config = load_adapter(m, adapter)  # its pairs are new LoRA layers, trainable like apply_lora's
    else:
        config = LoRAConfig(r=16, alpha=32)
        apply_lora(m, config, prefixes=("text_model.",))
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    order = random.Random(seed)
    report = []
    losses = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        picked = order.sample(train_set, batch_size)
        batch = collator([s for s, _ in picked]).to(vlm.device)
        features = torch.stack([oracle_tokens(scene) for _, scene in picked])  # (B, T, D)
        labels = batch.labels[:, 1:]  # (B, L - 1)
        predicting = torch.zeros_like(batch.labels, dtype=torch.bool)
        predicting[:, :-1] = labels != -100
        logits = m(batch.input_ids, batch.attention_mask, image_features=features, logits_mask=predicting).logits
        loss = torch.nn.functional.cross_entropy(logits, labels[labels != -100])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % every == 0 or step == steps:
            exact = exact_match(m, collator, eval_set, oracle_tokens, tokenizer, task)
            report.append({"step": step, "loss": sum(losses) / len(losses), "exact": exact,
                           "seconds": time.perf_counter() - start})
            losses.clear()
            print(json.dumps(report[-1]), file=sys.stderr)
            if save:
                save_adapter(m, config, save)
    return report


@torch.no_grad()
def exact_match(m, collator: Collator, samples: list[tuple], oracle_tokens: OracleTokens, tokenizer,
                task: str) -> float:
    """Greedy answers (no cache: they are a few tokens) against the references: token for token, or for grounding
    a box with IoU >= 0.5 (a few tokens of slack, since coordinates vary in digits)."""
    m.eval()
    device = m.lm_head.weight.device
    right = 0
    for sample, scene in samples:
        messages = sample.conversation()
        ids = collator.processor.encode_chat([messages[:1]], add_generation_prompt=True).input_ids.to(device)
        reference = messages[1]["content"][0]["text"]
        wanted = tokenizer.encode(reference, add_special_tokens=False)
        features = oracle_tokens(scene)[None]  # (1, T_img, D)
        produced = []
        for _ in range(len(wanted) + (4 if task == "grounding" else 0)):
            logits = m(ids, torch.ones_like(ids), image_features=features).logits[0, -1]
            produced.append(int(logits.argmax()))
            ids = torch.cat([ids, ids.new_tensor([[produced[-1]]])], dim=1)
        right += answer_right(task, produced, wanted, reference, tokenizer.decode)
    m.train()
    return right / len(samples)


def answer_right(task: str, produced: list[int], wanted: list[int], reference: str, decode) -> float:
    """1.0 when a greedy answer is right: token for token, or for grounding a box with IoU >= 0.5."""
    if task == "grounding":
        return score("grounding", decode(produced), reference)
    return float(produced == wanted)


def answer_cell(prediction: str) -> tuple[int, int] | None:
    """The (column, row) of the WHERE_CELLS-grid cell that holds the centre of a grounding answer's box (Qwen-VL
    coordinates, in [0, 1000) of the picture); None when the answer has no box."""
    box = parse_box(prediction)
    return None if box is None else where_cell((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (1000, 1000))


def shape_cell(meta: Mapping[str, Any]) -> tuple[int, int]:
    """The (column, row) of the WHERE_CELLS-grid cell that holds the centre of the shape a grounding question asks
    for (the cell whose words a `--where-words` tower's token says)."""
    x0, y0, x1, y1 = grounded_box(meta)
    return where_cell((x0 + x1) / 2, (y0 + y1) / 2, meta["images"][0]["size"])


def breakdown(report_path: str, data_path: str) -> dict[str, dict[str, float]]:
    """Exact match of an eval report's spatial answers per axis, counting answers per true count, largest-bar
    answers by whether the two tallest bars' centres share a row of image tokens, and per column and row of the
    shape's 16-px cell the grounding answers whose box is centred in that column (row)."""
    try:
        report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{report_path}: not a readable JSON report ({e}); write it with `smolvlm eval ... --out`")
    meta = metas_by_id(data_path)
    if not isinstance(report, dict) or "predictions" not in report:
        raise SystemExit(f"{report_path}: no predictions; write the report with `smolvlm eval ... --out`")
    missing = [p["id"] for p in report["predictions"]
               if p["task"] in ("spatial", "count", "chart", "grounding") and p["id"] not in meta]
    if missing:
        raise SystemExit(f"{report_path}: {len(missing)} predictions (e.g. {missing[0]}) are not in {data_path}; "
                         "pass the eval JSONL that the report scored")
    groups: dict[str, list[float]] = defaultdict(list)
    for p in report["predictions"]:
        if p["task"] == "spatial":
            groups[f"spatial, {meta[p['id']]['axis']}"].append(p["score"])
        elif p["task"] == "count":
            groups[f"count, {p['reference']}"].append(p["score"])
        elif p["task"] == "chart" and meta[p["id"]].get("question") == "largest":
            scene = meta[p["id"]]["images"][0]
            token = scene["size"][1] / GRID
            first, second = sorted((y0 + y1) / 2 // token for _, y0, _, y1 in (b["box"] for b in scene["bars"]))[:2]
            groups["largest bar, " + ("top two in one token row" if first == second else "top two in two rows")
                   ].append(p["score"])
        elif p["task"] == "grounding":
            truth = shape_cell(meta[p["id"]])
            said = answer_cell(p["prediction"]) or (-1, -1)
            for axis, name in enumerate(("column", "row")):
                groups[f"grounding {name} {truth[axis]:02d}"].append(float(said[axis] == truth[axis]))
    return {key: {"right": sum(scores) / len(scores), "n": len(scores)} for key, scores in sorted(groups.items())}


def figures(args: argparse.Namespace) -> Any:
    """Run the chosen subcommand; its figures."""
    if args.command == "collisions":
        return collisions(args.signs, args.n)
    if args.command == "tokens":
        return token_accuracy(args.model, args.data, args.limit, args.where)
    if args.command == "count-tokens":
        return count_from_tokens(args.model, args.data)
    if args.command == "breakdown":
        return breakdown(args.report, args.data)
    if args.command == "image-tokens":
        return image_tokens(args.model, args.image)
    if args.command == "snap-ceiling":
        return snap_ceiling(args.data, args.cell)
    return oracle(args.model, args.train, args.eval, args.task, args.layout, args.steps, args.lr, args.batch_size,
                  args.seed, args.n_eval, args.device, args.every, args.snap, args.adapter, args.save)


def main(argv: list[str] | None = None) -> int:
    """Parse the subcommand and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collisions")
    c.add_argument("--signs", default="proportional", choices=SIGN_LAYOUTS)
    c.add_argument("--n", type=int, default=300)
    t = sub.add_parser("tokens")
    t.add_argument("-m", "--model", default="demo")
    t.add_argument("--data", required=True, help="synthetic JSONL (its scenes are scored)")
    t.add_argument("--limit", type=int, default=280)
    t.add_argument("--where", action="store_true", help="a `--where-words` tower: also score each shape's cell words")
    k = sub.add_parser("count-tokens")
    k.add_argument("-m", "--model", default="demo")
    k.add_argument("--data", required=True, help="synthetic JSONL with counting questions")
    i = sub.add_parser("image-tokens")
    i.add_argument("-m", "--model", default="demo")
    i.add_argument("image")
    o = sub.add_parser("oracle")
    o.add_argument("-m", "--model", required=True, help="the untrained base (`python -m smolvlm.demo base`)")
    o.add_argument("--train", required=True)
    o.add_argument("--eval", required=True)
    o.add_argument("--task", required=True, choices=("ocr", "count", "spatial", "colour", "exists", "grounding"))
    o.add_argument("--layout", default="plain", choices=("plain", "col", "ord", "half", "grid"))
    o.add_argument("--steps", type=int, default=150)
    o.add_argument("--lr", type=float, default=5e-4)
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--n-eval", type=int, default=40, help="held-out questions scored")
    o.add_argument("--every", type=int, default=50, help="score every N steps")
    o.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    o.add_argument("--snap", type=int, default=0, metavar="CELL",
                   help="grounding: train on boxes snapped to CELL-px cells (0: the true boxes)")
    o.add_argument("--adapter", metavar="DIR", help="train on from this LoRA adapter (a `--save` folder, the demo's)")
    o.add_argument("--save", metavar="DIR", help="write the adapter here at every report")
    n = sub.add_parser("snap-ceiling")
    n.add_argument("--data", required=True, help="synthetic JSONL with grounding questions")
    n.add_argument("--cell", type=int, default=16, help="cell side in pixels")
    b = sub.add_parser("breakdown")
    b.add_argument("--report", required=True, help="`smolvlm eval --out` JSON (it holds every prediction)")
    b.add_argument("--data", required=True, help="the eval JSONL it scored (its meta names each question's axis)")
    for p in (c, t, k, i, o, b, n):
        p.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    args = parser.parse_args(argv)
    try:
        result = figures(args)
    except (OSError, SmolVLMError) as e:  # a missing or unreadable file or model: one line, as `smolvlm` gives
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    elif args.command == "snap-ceiling":
        print(f"snapped to {args.cell}-px cells: {100 * result['right']:.1f}% of {result['n']} boxes right")
    elif args.command in ("tokens", "breakdown"):
        for kind, row in result.items():
            print(f"{kind:<28} {100 * row['right']:5.1f}% right  (n={row['n']})")
    elif args.command == "image-tokens":
        background = token_word_list()[0]
        for r, row in enumerate(result):
            for c, words in enumerate(row):
                if words[0] != background:
                    print(f"row {r} col {c}: {''.join(words)}")
    elif isinstance(result, dict):
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value:.4g}")
    else:
        for row in result:
            print(f"step {row['step']:>4}  loss {row['loss']:.3f}  exact {100 * row['exact']:5.1f}%  "
                  f"({row['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
