"""Fine-tuning loop (nanoGPT style): one config dataclass, one Trainer, one `train()`.

Stages are configs: each part (vision, connector, text) is `frozen`, `lora` or `full`, with its own learning rate.
AdamW with linear warmup then cosine decay, gradient clipping and accumulation, bf16 autocast on GPU, optional
gradient checkpointing, optional distillation from a teacher (distill.py).

The global batch (`batch_size` samples per optimizer step) is the same whatever the number of processes: under
torchrun each rank takes its slice of every micro-batch group, and the loss is the sum over all assistant tokens of
the global batch divided by their global count, so one process and N processes follow the same curve.

Checkpoints (every `save_every` steps, last `keep_last` kept) are written to a temp dir and renamed into place:
    OUT/checkpoints/step-0000100/   HF folder (merged model + processor files; `smolvlm.load` opens it)
                                    [+ PEFT adapter] + trainable.safetensors, optimizer.safetensors, trainer_state.json
Resuming reloads the base model, re-applies the freeze/LoRA policy, then the trainable tensors, optimizer moments,
step (the data position and LR follow from it) and RNG states — the continued run is bit-identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

from smolvlm.errors import ConfigError, DataError
from smolvlm.model import SmolVLM
from smolvlm.processing import Processor
from smolvlm.train.data import BadData, Collator, Sample, TrainBatch, load_samples
from smolvlm.train.distill import check_same_tokenizer, distill_loss_sum, predicting_positions
from smolvlm.train.lora import (
    LoRAConfig, apply_lora, continue_adapter, lora_modules, merge_lora, save_adapter, wrap_linears,
)
from smolvlm.train.prefetch import prefetched
from smolvlm.weights.checkpoint import load_smolvlm, save_smolvlm, save_tensors

log = logging.getLogger("smolvlm.train")
PARTS = {"vision": ("vision_model.",), "connector": ("connector.",), "text": ("text_model.", "lm_head.")}
POLICIES = ("frozen", "lora", "full")
PRECISIONS = ("auto", "bf16", "fp32")  # of the forward passes; weights, gradients and optimizer state stay fp32
OBJECTIVES = ("lm", "scene")
STATE_FILES = ("trainable.safetensors", "optimizer.safetensors", "trainer_state.json")


@dataclass
class TrainConfig:
    """Everything a run needs; `smolvlm train` exposes each field as --flag-name."""

    objective: str = "lm"  # lm: next-token loss on the answers; scene: dense scene labels for the vision tower
    model: str = ""  # base checkpoint folder
    data: str = ""  # JSONL, saved HF dataset folder or parquet; several joined by commas
    out: str = "runs/train"
    eval_data: str = ""  # eval JSONL (metrics.score per task)
    teacher: str = ""  # distillation teacher folder
    # stage: what trains, and how fast
    vision: str = "frozen"
    connector: str = "full"
    text: str = "full"
    lr: float = 1e-4
    vision_lr: float = 0.0  # 0: use lr
    connector_lr: float = 0.0
    text_lr: float = 0.0
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""  # comma-separated regexes; empty: every projection
    continue_adapter: str = ""  # an adapter merged into --model, trained on (its rank, alpha and targets)
    centre_slack: float = 0.0  # scene objective: px from a token border within which a thing may be said either side
    where_words: bool = False  # scene objective: a shape's token also names the 16th of the picture its centre is in
    # optimisation
    max_steps: int = 100
    batch_size: int = 8  # global samples per optimizer step
    micro_batch_size: int = 0  # samples per forward per process; 0: batch_size / world size
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    max_length: int = 2048
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each vision and text layer (one compile serves every layer of a kind)
    precision: str = "auto"  # auto: bf16 autocast on a GPU, fp32 on the CPU (scene: fp32); bf16 or fp32 on either
    # distillation
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    # bookkeeping
    seed: int = 0
    device: str = "auto"
    fsdp: bool = False
    strict: bool = False
    scan: bool = False  # encode every sample once before training (always on under torchrun and with --strict)
    data_workers: int = 0  # processes building batches ahead (0: one background thread; a GPU step needs several)
    log_every: int = 1
    eval_every: int = 0
    eval_limit: int = 0
    eval_batch_size: int = 8
    eval_max_new_tokens: int = 32
    save_every: int = 0
    keep_last: int = 2
    resume: bool = False
    progress: bool = True
    tensorboard: bool = True

    def part_lr(self, part: str) -> float:
        """The learning rate of one part."""
        return getattr(self, f"{part}_lr") or self.lr

    def lora_config(self) -> LoRAConfig:
        """LoRA settings for the parts whose policy is `lora`."""
        config = LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout)
        if self.lora_targets:
            config.targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        return config

    def check(self) -> None:
        """Raise ConfigError on inconsistent settings."""
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not self.model or not self.data:
            raise ConfigError("train needs --model (a checkpoint folder) and --data (a dataset)")
        for part in PARTS:
            if getattr(self, part) not in POLICIES:
                raise ConfigError(f"--{part} must be one of {', '.join(POLICIES)}, got {getattr(self, part)!r}")
        if self.objective == "lm" and all(getattr(self, part) == "frozen" for part in PARTS):
            raise ConfigError("every part is frozen: set --vision/--connector/--text to lora or full")
        if self.max_steps <= 0 or self.batch_size <= 0:
            raise ConfigError("--max-steps and --batch-size must be positive")
        if self.compile and self.gradient_checkpointing:
            raise ConfigError("--compile and --gradient-checkpointing do not combine here: pick one")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.data_workers < 0:
            raise ConfigError(f"--data-workers must be 0 (a background thread) or more, got {self.data_workers}")
        if self.centre_slack < 0 or (self.centre_slack and (self.objective != "scene" or self.connector != "full")):
            raise ConfigError("--centre-slack (pixels, >= 0) places the image tokens' words: it needs --objective "
                              f"scene and --connector full, got {self.centre_slack}")
        if self.where_words and (self.objective != "scene" or self.connector != "full"):
            raise ConfigError("--where-words adds words to the image tokens' targets: it needs --objective scene and "
                              "--connector full")
        if self.continue_adapter and "lora" not in (self.vision, self.connector, self.text):
            raise ConfigError("--continue-adapter trains an adapter on: set the parts it adapts to lora "
                              "(e.g. --text lora)")


def forward_precision(precision: str, device: torch.device, auto_bf16_on_gpu: bool = True
                      ) -> contextlib.AbstractContextManager:
    """The autocast of a training forward pass: bf16 when `precision` says so, or under "auto" on a GPU (unless
    `auto_bf16_on_gpu` is off); fp32 otherwise. On a CPU with AMX (Sapphire Rapids and later) bf16 matmuls run several
    times faster than fp32 ones."""
    if precision == "bf16" or (precision == "auto" and auto_bf16_on_gpu and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class DistState:
    """This process's place in a torchrun job (world 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistState:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistState()
    state = DistState(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(state.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return state


def save_run_folder(model: SmolVLM, processor: Processor, base: str | Path, directory: Path) -> None:
    """Write a loadable HF folder: weights, config, processor files and the base's generation config."""
    save_smolvlm(model, directory)
    processor.save(directory)
    generation = Path(base) / "generation_config.json"
    if generation.is_file():
        shutil.copy(generation, directory / "generation_config.json")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine from 1 down to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def part_of(name: str) -> str:
    """Which part (vision / connector / text) a parameter name belongs to."""
    return next(part for part, prefixes in PARTS.items() if name.startswith(prefixes))


def apply_policy(model: torch.nn.Module, config: TrainConfig) -> LoRAConfig | None:
    """Freeze, LoRA-wrap or fully train each part; returns the LoRA config when any part uses LoRA."""
    for p in model.parameters():
        p.requires_grad_(False)
    lora_parts = [part for part in PARTS if getattr(config, part) == "lora"]
    prefixes = [prefix for part in lora_parts for prefix in PARTS[part]]
    if config.continue_adapter:
        lora = continue_adapter(model, config.continue_adapter, prefixes, config.lora_dropout)
    else:
        lora = config.lora_config() if lora_parts else None
        if lora is not None:
            apply_lora(model, lora, prefixes)
    for name, p in model.named_parameters():
        policy = getattr(config, part_of(name))
        p.requires_grad_(policy == "full" or (policy == "lora" and ".lora_" in name))
    return lora


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each vision and text layer in the backward pass instead of keeping its activations."""
    for layer in [*model.vision_model.encoder.layers, *model.text_model.layers]:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile every vision and text layer in place. A training step is thousands of small ops (LoRA adds five
    per linear), which on a GPU cost more to launch than to run; layers of a kind share one compiled graph, and
    sequence lengths are marked dynamic after the first change, so a run compiles a few times, not every step."""
    for layer in [*model.vision_model.encoder.layers, *model.text_model.layers]:
        layer.compile()


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": [v.tolist() if isinstance(v, np.ndarray) else v
                                                  for v in np.random.get_state()]}
    return {**state, "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class Trainer:
    """Builds model, data, optimizer and logs from a TrainConfig; `train()` runs to max_steps."""

    def __init__(self, config: TrainConfig) -> None:
        config.check()
        self.config = config
        self.dist = init_distributed(config.device)
        self.device = self._device()
        torch.manual_seed(config.seed + self.dist.rank)
        self.out = Path(config.out)
        self.processor = Processor.from_pretrained(config.model)
        self.model = load_smolvlm(config.model, device=self.device, dtype=torch.float32)
        self.lora = apply_policy(self.model, config)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        if config.compile:
            compile_layers(self.model)
        self.teacher = self._teacher()
        self.bad = BadData(config.strict)
        self.collator = Collator(self.processor, config.max_length, self.bad)
        self.samples = load_samples(config.data, self.bad)
        if config.scan or config.strict or self.dist.world > 1:
            self.samples = self.collator.scan(self.samples)
        if not self.samples:
            raise DataError(f"{config.data}: no usable training samples")
        self.eval_samples = self._eval_samples()
        self.micro, self.accum = self._batch_shape()
        self.wrapped = self._wrap()
        # After wrapping: FSDP replaces the parameters by sharded ones, and the optimizer must hold those.
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = self._optimizer()
        self.step = 0
        if config.resume:
            self.resume()
        self.log_file = None
        self.tb = None

    # ---- setup ----

    def _device(self) -> torch.device:
        name = self.config.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:  # one GPU per process under torchrun
            device = torch.device("cuda", self.dist.local_rank)
        return device

    def _teacher(self) -> torch.nn.Module | None:
        if not self.config.teacher:
            return None
        check_same_tokenizer(self.processor, Processor.from_pretrained(self.config.teacher), self.config.teacher)
        teacher = load_smolvlm(self.config.teacher, device=self.device, dtype=torch.float32).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def _eval_samples(self) -> list[Sample]:
        if not self.config.eval_data:
            return []
        samples = load_samples(self.config.eval_data, BadData(self.config.strict))
        return samples[: self.config.eval_limit] if self.config.eval_limit else samples

    def _batch_shape(self) -> tuple[int, int]:
        """(micro batch per process, accumulation steps) so that micro · accum · world = batch_size."""
        world, batch = self.dist.world, self.config.batch_size
        micro = self.config.micro_batch_size or max(1, batch // world)
        if batch % (micro * world):
            raise ConfigError(f"--batch-size {batch} is not a multiple of --micro-batch-size {micro} x {world} "
                              "processes; pick sizes that divide evenly so every process sees the same share")
        return micro, batch // (micro * world)

    def _optimizer(self) -> torch.optim.Optimizer:
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, p in self.trainable:
            groups.setdefault((part_of(name), p.dim() >= 2), []).append(p)
        param_groups = [
            {"params": params, "base_lr": self.config.part_lr(part), "lr": self.config.part_lr(part),
             "weight_decay": self.config.weight_decay if decay else 0.0, "name": f"{part}{'' if decay else '.nodecay'}"}
            for (part, decay), params in groups.items()
        ]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(param_groups, betas=(self.config.beta1, self.config.beta2), fused=fused)

    @property
    def sharded(self) -> bool:
        """True when FSDP shards the parameters over the processes."""
        return self.config.fsdp and self.dist.world > 1

    def _wrap(self) -> torch.nn.Module:
        if self.dist.world == 1:
            return self.model
        if self.config.fsdp:  # FSDP2: each vision/text layer is one shard unit, the rest goes with the root
            from torch.distributed.fsdp import fully_shard

            for layer in [*self.model.vision_model.encoder.layers, *self.model.text_model.layers]:
                fully_shard(layer)
            return fully_shard(self.model)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    # ---- data ----

    def sample_index(self, position: int) -> int:
        """The dataset index at global position `position`: epoch-wise permutations seeded by (seed, epoch)."""
        n = len(self.samples)
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 100003 + epoch))
        return int(order[offset])

    def micro_batches(self, step: int) -> list[TrainBatch | None]:
        """This process's micro-batches of global step `step` (rank r takes slice r of every group); None where
        every sample of a micro-batch was skipped as bad."""
        base = step * self.config.batch_size
        batches = []
        for a in range(self.accum):
            start = base + (a * self.dist.world + self.dist.rank) * self.micro
            samples = [self.samples[self.sample_index(k)] for k in range(start, start + self.micro)]
            encoded, _ = self.collator.encode_many(samples)
            batches.append(self.collator.collate(encoded) if encoded else None)
        return batches

    def _step_data(self, step: int) -> tuple[list[TrainBatch | None], dict[str, int]]:
        """micro_batches(step) and the bad samples it skipped, by reason (a worker process's counts die with it)."""
        before = dict(self.bad.counts)
        batches = self.micro_batches(step)
        return batches, {k: n - before.get(k, 0) for k, n in self.bad.counts.items() if n != before.get(k, 0)}

    # ---- one step ----

    def _gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation group."""
        if self.dist.world == 1 or enabled:
            return contextlib.nullcontext()
        if self.sharded:
            self.wrapped.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def _all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.dist.world > 1:
            dist.all_reduce(value)
        return value

    def train_step(self, step: int, micro_batches: list[TrainBatch | None] | None = None) -> dict[str, float]:
        """Forward/backward over the global batch of `step` (its micro-batches, built here unless given), clip,
        AdamW step; returns the step's metrics."""
        config = self.config
        factor = lr_factor(step, config.warmup_steps, config.max_steps, config.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        if micro_batches is None:
            micro_batches = self.micro_batches(step)
        batches = [b.to(self.device) for b in micro_batches if b is not None]
        counts = torch.tensor([float((b.labels[:, 1:] != -100).sum()) for b in batches] +
                              [float(b.attention_mask.sum()) for b in batches], device=self.device)
        counts = self._all_sum(counts)
        n_labels = counts[: len(batches)].sum().clamp(min=1)
        sums = torch.zeros(3, device=self.device)  # loss, ce, kl
        self.model.train()
        for a, batch in enumerate(batches):
            last = a == len(batches) - 1
            if self.sharded and last:
                self.wrapped.set_requires_gradient_sync(True)
            with self._gradient_sync(last):
                with forward_precision(config.precision, self.device):
                    if self.teacher is not None:
                        logits = self.wrapped(**batch.model_inputs()).logits  # (B, T, V)
                        with torch.no_grad():
                            teacher_logits = self.teacher(**batch.model_inputs()).logits
                        loss, ce, kl = distill_loss_sum(logits, teacher_logits, batch.labels,
                                                        config.distill_weight, config.distill_temperature)
                    else:  # logits only where a label is predicted: the LM head over every position is waste
                        mask, targets = predicting_positions(batch.labels)
                        logits = self.wrapped(**batch.model_inputs(), logits_mask=mask).logits  # (N, V)
                        loss = ce = F.cross_entropy(logits.float(), targets, reduction="sum")
                        kl = torch.zeros((), device=self.device)
                # DDP averages gradients over ranks; scaling by world turns that into a sum over the global batch.
                (loss * self.dist.world / n_labels).backward()
            sums += torch.stack([loss.detach(), ce.detach(), kl.detach()])
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], config.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums = self._all_sum(sums) / n_labels
        metrics = {"loss": float(sums[0]), "lr": config.lr * factor, "grad_norm": float(grad_norm),
                   "tokens": float(counts[len(batches):].sum()), "label_tokens": float(n_labels)}
        if self.teacher is not None:
            metrics.update(ce=float(sums[1]), kl=float(sums[2]))
        return metrics

    # ---- loop ----

    def train(self) -> dict[str, Any]:
        """Run from the current step to max_steps; returns the last metrics (and eval table, when evaluated)."""
        if self.dist.main:
            self._open_logs()
        try:
            metrics = self._loop()
        finally:
            self._close_logs()
        return metrics

    def _loop(self) -> dict[str, Any]:
        config = self.config
        bar = None
        if self.dist.main and config.progress:
            from tqdm import tqdm

            bar = tqdm(total=config.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        metrics: dict[str, Any] = {}
        start, tokens = time.perf_counter(), 0.0
        for batches, skipped in prefetched(self._step_data, range(self.step, config.max_steps), config.data_workers):
            if config.data_workers:  # built in another process: its skips were counted there
                for reason, n in skipped.items():
                    self.bad.counts[reason] = self.bad.counts.get(reason, 0) + n
            metrics = self.train_step(self.step, batches)
            self.step += 1
            tokens += metrics["tokens"]
            elapsed = time.perf_counter() - start
            metrics.update(step=self.step, tok_per_s=tokens / elapsed, elapsed_s=elapsed, skipped=self.bad.total)
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                self._log(metrics)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tok_per_s']:.0f}")
                bar.update(1)
            if config.eval_every and self.eval_samples and self.step % config.eval_every == 0:
                metrics["eval"] = self.run_eval()
            if config.save_every and self.step % config.save_every == 0 and self.step < config.max_steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.eval_samples and "eval" not in metrics:
            metrics["eval"] = self.run_eval()
        self.export(self.out / "final")
        if self.bad.total and self.dist.main:
            log.warning("skipped %d bad samples: %s", self.bad.total, self.bad.counts)
        return metrics

    def run_eval(self) -> dict[str, dict[str, float]] | None:
        """Greedy generation + scoring of the eval set on rank 0 (others wait); logs and returns the table."""
        table = None
        if self.dist.main:
            from smolvlm.api import VLM
            from smolvlm.eval.tasks import evaluate

            report = evaluate(VLM(self.model, self.processor), self.eval_samples, self.config.eval_batch_size,
                              self.config.eval_max_new_tokens)
            self.model.train()
            table = report.table
            self._log({"step": self.step, "eval": table})
        if self.dist.world > 1:
            dist.barrier()
        return table

    # ---- logs ----

    def _open_logs(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = (self.out / "log.jsonl").open("a", encoding="utf-8")
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed; logging to log.jsonl only")
            else:
                self.tb = SummaryWriter(str(self.out / "tensorboard"))

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.main or self.log_file is None:
            return
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
            for task, row in (record.get("eval") or {}).items():
                self.tb.add_scalar(f"eval/{task}", row["score"], record["step"])

    def _close_logs(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    # ---- checkpoints ----

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole model state dict on the CPU (gathered from the shards under FSDP; a collective call)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def export(self, directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write a loadable HF folder (LoRA merged, processor files) [+ the PEFT adapter]; rank 0 writes."""
        state = self.full_state() if state is None else state
        if not self.dist.main:
            return
        with torch.random.fork_rng(devices=[]):  # building layers draws random inits; keep the training RNG intact
            self._write_export(state, directory)

    def _write_export(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        model = SmolVLM(self.model.config)
        if self.lora is not None:  # the training model's LoRA layers, to load its state into
            wrap_linears(model, lora_modules(self.model), self.lora)
        model.load_state_dict(state)
        if self.lora is not None:
            full = [prefix.rstrip(".") for part, prefixes in PARTS.items() if getattr(self.config, part) == "full"
                    for prefix in prefixes]
            base = self.lora.base_model or self.config.model  # a continued adapter keeps its own base
            save_adapter(model, self.lora, directory, base_model=base, full_modules=full)
            merge_lora(model)
        save_run_folder(model, self.processor, self.config.model, directory)

    def save_checkpoint(self) -> Path:
        """Write OUT/checkpoints/step-N atomically (temp dir + rename) and keep the last `keep_last`."""
        root = self.out / "checkpoints"
        final = root / f"step-{self.step:07d}"
        tmp = root / f".tmp-step-{self.step:07d}"
        rng = _rng_state()
        rngs = [None] * self.dist.world
        if self.dist.world > 1:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        model_state = self.full_state()
        self.export(tmp, model_state)
        if self.dist.main:
            save_tensors({n: model_state[n].contiguous() for n, _ in self.trainable}, tmp / STATE_FILES[0])
            optim = self.optimizer.state_dict()
            if not self.sharded:  # sharded moments are not gathered: an FSDP checkpoint restarts the optimizer
                tensors = {f"{i}.{k}": v.cpu().contiguous() for i, s in optim["state"].items() for k, v in s.items()}
                save_tensors(tensors, tmp / STATE_FILES[1])
            groups = [{k: v for k, v in g.items()} for g in optim["param_groups"]]
            state = {"step": self.step, "rng": rngs, "param_groups": groups, "skipped": self.bad.counts,
                     "config": dataclasses.asdict(self.config), "world": self.dist.world,
                     "optimizer": not self.sharded}
            (tmp / STATE_FILES[2]).write_text(json.dumps(state), encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(root.glob("step-*"))[: -self.config.keep_last or None]:
                shutil.rmtree(old, ignore_errors=True)
        if self.dist.world > 1:
            dist.barrier()
        return final

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint under OUT/checkpoints, if any."""
        done = [p for p in sorted((self.out / "checkpoints").glob("step-*")) if (p / STATE_FILES[2]).is_file()]
        return done[-1] if done else None

    def resume(self) -> None:
        """Restore trainable tensors, optimizer, step and RNG from the latest checkpoint (a fresh start if none)."""
        path = self.latest_checkpoint()
        if path is None:
            log.info("no checkpoint under %s; starting from step 0", self.out)
            return
        state = json.loads((path / STATE_FILES[2]).read_text(encoding="utf-8"))
        if self.sharded or not state.get("optimizer", True):
            raise ConfigError(f"{path}: exact resume is not supported for FSDP runs yet (optimizer moments are "
                              "sharded); resume with DDP (drop --fsdp) from a DDP checkpoint, or start anew")
        if state["world"] != self.dist.world:
            log.warning("resuming a %d-process run on %d processes: RNG streams are not continued exactly",
                        state["world"], self.dist.world)
        tensors = load_file(str(path / STATE_FILES[0]))
        params = dict(self.trainable)
        if set(tensors) != set(params):
            raise ConfigError(f"{path}: its trainable tensors do not match this run's freeze/LoRA settings; resume "
                              "with the same --vision/--connector/--text/--lora-* options")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        moments = load_file(str(path / STATE_FILES[1]))  # load_state_dict moves moments to their params
        optim_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in moments.items():
            index, name = key.split(".", 1)
            optim_state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": state["param_groups"]})
        self.step = state["step"]
        self.bad.counts = dict(state["skipped"])
        _set_rng_state(state["rng"][min(self.dist.rank, len(state["rng"]) - 1)])
        log.info("resumed from %s at step %d", path, self.step)


def train(config: TrainConfig) -> dict[str, Any]:
    """Build a Trainer (or the scene stage) and run it; returns the last step's metrics."""
    config.check()
    if config.objective == "scene":
        from smolvlm.train.scene_pretrain import train_scene

        return train_scene(config)
    trainer = Trainer(config)
    try:
        metrics = trainer.train()
        if dist.is_initialized():
            dist.barrier()  # every rank done with its last collective before any tears the group down
        return metrics
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
