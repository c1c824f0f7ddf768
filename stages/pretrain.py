"""pretrain: the token cache -> a class-conditional AR image model (``gpt`` or ``var``), CFG-ready.

Reads ``paths.tokens/{train,val}.parquet`` (refusing a cache from another tokenizer) and the
tokenizer in ``paths.tokenizer`` (VAR's input is built by its multi-scale quantizer; samples are
decoded by it). Trains under ``accelerate``: one process by default, several (processes, GPUs,
nodes) when ``launcher`` names an accelerate config (see ``accelerate/``). AdamW (no decay on
norms, biases and embeddings), linear warmup then cosine/linear decay, gradient clipping, gradient
accumulation, bf16 autocast option, optional EMA weights. Labels are dropped to the null class with
the model's ``class_dropout`` for classifier-free guidance.

Writes:
- ``paths.models/base/model.safetensors`` + ``config.json`` (arch, architecture, tokenizer
  fingerprint, token layout, class names, this stage's params, fingerprint) and ``samples.png``
  (one row per class; guidance-free on the left, then each ``sample_cfg_scales`` scale)
- ``paths.plots/pretrain/{train,val}.csv`` and ``metrics/pretrain.json``

With ``init_from: champion`` the model starts from the registered champion that the
``init_model`` stage fetched into ``paths.models/init`` (read there, never from MLflow, so DVC sees
the start point). With ``init_from: released`` the model starts from a released checkpoint file
(``released.file`` under ``paths.released``, converted by ``models.released`` and paired with the
tokenizer in ``paths.tokenizer``): ``steps: 0`` writes it as is (an import, with the val loss and
sample grid), ``steps > 0`` fine-tunes it on the token cache.

A killed run resumes from ``paths.resume`` and ends with weights byte-identical to an
uninterrupted one (CPU). Run by DVC as ``python -m stages.pretrain``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from core.checkpoint import read_checkpoint, write_checkpoint
from core.config import Paths
from core.images import guidance_grid, save_png
from core.metrics import flatten_metrics
from core.registry import check_state_fits
from core.released import ImportFailed, ReleasedModel, load_released, merge_model, source_entry
from core.stage import stage_main
from core.start_point import read_start_point, start_point_dir
from core.token_store import load_tokens
from core.training import (
    EMA,
    Resume,
    build_accelerator,
    check_finite,
    compile_model,
    matmul_peak_flops,
    process_state,
    recorded_config,
    resume_dir,
    seed_everything,
    step_bar,
    step_generator,
    warmup_decay_lr,
)
from models.ar import build_ar, sample_per_guidance, tokenizer_from_state
from models.released import FORMATS, ReleasedFormatError, released_checkpoint

STAGE = "pretrain"
OUT_NAME = "base"
DEFAULT_MODEL = {  # ~1.4M params at 16 tokens, 600 steps: ~2 min on 2 CPU cores (0.4 dropouts at 1500 steps)
    "depth": 3,  # width 64·depth and depth heads follow unless set
    "token_dropout": 0.25,
    "resid_dropout": 0.25,
    "ffn_dropout": 0.25,
}
# Model keys the stage takes from the token cache and the tokenizer, never from params.yaml.
DERIVED_KEYS = {
    "gpt": ("vocab_size", "seq_len", "num_classes", "grid"),
    "var": ("vocab_size", "scales", "embed_dim", "num_classes"),
}
TRAIN_COLUMNS = ("step", "loss", "token_acc", "lr", "grad_norm")  # speed goes to MLflow only
FINETUNE_KEYS = frozenset({"class_dropout", "token_dropout", "resid_dropout", "ffn_dropout", "drop_path"})
"""``model`` keys that may differ from a released model's when fine-tuning it (regularisation only)."""


@dataclass(frozen=True, kw_only=True)
class Config:
    arch: Literal["gpt", "var"] = "gpt"
    """``gpt``: next-token over a ``vq`` token grid; ``var``: next-scale over ``msvq`` tokens."""
    model: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_MODEL))
    """Architecture keys of models/gpt.py GPTConfig or models/var.py VARConfig (depth, width, heads,
    dropouts, ...). vocab_size, sequence layout and num_classes come from the token cache."""
    steps: int = 600
    """Optimizer steps."""
    batch_size: int = 64
    """Sequences per optimizer step over all processes and accumulation micro-batches."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (each process runs batch_size / processes / grad_accum)."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, down to ``min_lr_ratio·lr`` at the last step."""
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    """AdamW decay on matmul weights only (norms, biases, embeddings get none)."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = no clipping)."""
    ema_decay: float = 0.0
    """EMA of the weights written as the model (0 = off: the final weights are written)."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """bf16 autocast on GPUs; fp32 on CPU."""
    compile: bool = False
    """torch.compile the prepared model for training (GPUs: faster steps after a first step that
    compiles; off on CPU). Eager and compiled runs differ in rounding; resume is exact either way."""
    seed: int = 0
    log_every: int = 25
    """Steps between logged training curves (MLflow and plots/pretrain/train.csv)."""
    eval_every: int = 250
    """Steps between val loss / token accuracy (the last step is always evaluated)."""
    sample_every: int = 0
    """Steps between sample grids logged to MLflow (0 = only at the end)."""
    save_every: int = 250
    """Steps between resume states (0 = never)."""
    samples_per_class: int = 8
    """Columns of the sample grid, per guidance scale."""
    sample_cfg_scales: list[float] = field(default_factory=lambda: [1.0, 3.0])
    """Guidance scales of the sample grids (1.0 = guidance-free; logits = u + cfg_scale·(c − u))."""
    launcher: str = ""
    """accelerate config file to run under (e.g. accelerate/cpu-2proc.yaml); "" = this process."""
    init_from: Literal["scratch", "champion", "released"] = "scratch"
    """``scratch``: random init. ``released``: the released model in ``released``, paired with the
    tokenizer in ``paths.tokenizer`` (its architecture; ``model`` may restate it and change only
    ``FINETUNE_KEYS``); ``steps: 0`` imports it, ``steps > 0`` fine-tunes it. ``champion``: start
    from the weights of the MLflow registry's ``arpipe-<arch>@champion`` (or version
    ``init_version``), e.g. for scheduled retraining, which the ``init_model`` stage fetches into
    ``paths.models/init`` (a DVC dependency of this stage: DVC re-runs it when the champion moved,
    and only then); the version used is recorded in config.json."""
    init_version: int = 0
    """With ``init_from: champion``: the registered version of ``arpipe-<arch>`` to start from;
    0 = whichever version the champion alias points to when ``init_model`` runs."""
    released: ReleasedModel = field(default_factory=ReleasedModel)
    """With ``init_from: released``: ``format`` (llamagen-gpt | var), ``file`` (under
    ``paths.released``) and ``model`` (GPT-B ... GPT-3B, d16 ... d30: heads are in no tensor)."""

    def __post_init__(self):
        for key in DERIVED_KEYS[self.arch]:
            if key in self.model:
                raise ValueError(f"model.{key} is set from the token cache; remove it from params.yaml")
        known = arch_config_fields(self.arch) - set(DERIVED_KEYS[self.arch])
        unknown = sorted(set(self.model) - known)
        if unknown:
            raise ValueError(
                f"model.{unknown[0]} is not a key of the {self.arch} architecture; "
                f"valid keys: {', '.join(sorted(known))}"
            )
        if self.steps < (0 if self.init_from == "released" else 1):
            raise ValueError(f"steps must be >= 1 (0 = import only, with init_from: released), got {self.steps}")
        if self.init_from == "released" and self.released.format not in FORMATS:
            raise ValueError(f"released.format {self.released.format!r} is not a released format: {', '.join(FORMATS)}")
        positive = ("batch_size", "grad_accum", "log_every", "eval_every", "samples_per_class")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0, min_lr_ratio in [0, 1] and warmup_steps >= 0")
        if self.grad_clip < 0 or self.save_every < 0 or self.sample_every < 0:
            raise ValueError("grad_clip, save_every and sample_every must be >= 0")
        if not (self.ema_decay == 0 or 0 < self.ema_decay < 1):
            raise ValueError(f"ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay}")
        if not self.sample_cfg_scales:
            raise ValueError("sample_cfg_scales needs at least one guidance scale (1.0 = guidance-free)")
        if self.init_version < 0 or (self.init_version and self.init_from != "champion"):
            raise ValueError(
                f"init_version {self.init_version} needs init_from: champion and must be >= 1 (0 = the champion)"
            )


def arch_config_fields(arch: str) -> set[str]:
    """Field names of the architecture config of ``arch`` (GPTConfig or VARConfig)."""
    from models.gpt import GPTConfig
    from models.var import VARConfig

    return {f.name for f in dataclasses.fields(GPTConfig if arch == "gpt" else VARConfig)}


# -- inputs ------------------------------------------------------------------------------------


def load_tokenizer(tokenizer_dir: str | Path):
    state_dict, config = read_checkpoint(tokenizer_dir, stage="train_tokenizer")
    return tokenizer_from_state(state_dict, config), config


def model_config(cfg: Config, tokenizer_config: dict, token_layout: dict, vocab_size: int, seq_len: int) -> dict:
    """params.yaml ``model`` + the keys the data fixes."""
    num_classes = len(tokenizer_config["class_names"])
    if cfg.arch == "gpt":
        if "grid" not in token_layout:
            raise ValueError(
                f"pretrain.arch gpt needs a single-scale token grid, but the cache holds {token_layout}: "
                "set train_tokenizer.kind: vq (or pretrain.arch: var for msvq tokens)"
            )
        derived = {"vocab_size": vocab_size, "seq_len": seq_len, "num_classes": num_classes,
                   "grid": list(token_layout["grid"])}  # fmt: skip
    else:
        if "scales" not in token_layout:
            raise ValueError(
                f"pretrain.arch var needs multi-scale tokens, but the cache holds {token_layout}: "
                "set train_tokenizer.kind: msvq (or pretrain.arch: gpt for vq tokens)"
            )
        derived = {"vocab_size": vocab_size, "scales": list(token_layout["scales"]), "num_classes": num_classes,
                   "embed_dim": tokenizer_config["model"]["z_channels"]}  # fmt: skip
    return {**cfg.model, **derived}


def batch_at(cfg: Config, tokens_NL: np.ndarray, labels_N: np.ndarray, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch: epochs are seeded permutations of the cache rows (a function of the
    step alone, so resuming needs no sampler state)."""
    count = len(tokens_NL)
    per_epoch = max(count // cfg.batch_size, 1)
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(count, generator=step_generator(cfg.seed, epoch, purpose=2)).numpy()
    index = order[within * cfg.batch_size : (within + 1) * cfg.batch_size]
    tokens_BL = torch.from_numpy(tokens_NL[index].astype(np.int64))
    labels_B = torch.from_numpy(labels_N[index].astype(np.int64))
    return tokens_BL, labels_B


# -- training ----------------------------------------------------------------------------------


def token_loss(logits_BLV: torch.Tensor, tokens_BL: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every token (VAR's uniform 1/L weighting), in fp32."""
    return F.cross_entropy(logits_BLV.float().flatten(0, 1), tokens_BL.flatten())


def scale_token_counts(token_layout: dict) -> list[int] | None:
    return [side * side for side in token_layout["scales"]] if "scales" in token_layout else None


@torch.no_grad()
def evaluate(model, tokens_NL: np.ndarray, labels_N: np.ndarray, token_layout: dict, batch_size: int = 256) -> dict:
    """Val loss (nats/token), token accuracy and, for multi-scale tokens, the loss per scale."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_correct, total = 0.0, 0, 0
    per_scale = scale_token_counts(token_layout)
    scale_nll = np.zeros(len(per_scale)) if per_scale else None
    for start in range(0, len(tokens_NL), batch_size):
        tokens_BL = torch.from_numpy(tokens_NL[start : start + batch_size].astype(np.int64)).to(device)
        labels_B = torch.from_numpy(labels_N[start : start + batch_size].astype(np.int64)).to(device)
        logits_BLV = model(tokens_BL, labels_B, label_dropout=False).float()
        nll_BL = F.cross_entropy(logits_BLV.transpose(1, 2), tokens_BL, reduction="none")
        total_nll += float(nll_BL.sum())
        total_correct += int((logits_BLV.argmax(-1) == tokens_BL).sum())
        total += tokens_BL.numel()
        if per_scale:
            for k, chunk in enumerate(nll_BL.split(per_scale, dim=1)):
                scale_nll[k] += float(chunk.sum())
    model.train(was_training)
    metrics = {"val_loss": total_nll / total, "val_token_acc": total_correct / total}
    if per_scale:
        rows = len(tokens_NL)
        sides = token_layout["scales"]
        metrics["val_scale_loss"] = {
            f"{s}x{s}": scale_nll[k] / (rows * n) for k, (s, n) in enumerate(zip(sides, per_scale, strict=True))
        }
    return metrics


def sample_grid(model, tokenizer, cfg: Config) -> np.ndarray:
    """One row per class: ``samples_per_class`` guidance-free samples, then the same for each other
    scale in ``sample_cfg_scales``, separated by a blank column (the family's authors' sampling)."""
    samples = sample_per_guidance(model, tokenizer, cfg.arch, cfg.samples_per_class, cfg.sample_cfg_scales, cfg.seed)
    return guidance_grid(samples, cfg.samples_per_class)


def run(cfg: Config, paths: Paths, tracker, on_step=None) -> dict:
    """Train and write the outs; ``on_step(step)`` runs after each step (tests use it to crash)."""
    released = cfg.released.path(paths.released, f"{STAGE}.released") if cfg.init_from == "released" else None
    # (folder, its init.json): a missing or stale start point is refused before any work
    champion = champion_folder(cfg, paths) if cfg.init_from == "champion" else None
    accelerator = build_accelerator(cfg.mixed_precision)
    seed_everything(cfg.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"pretrain.batch_size {cfg.batch_size} must be divisible by processes ({world}) x grad_accum "
            f"({cfg.grad_accum})"
        )
    tokenizer, tok_config = load_tokenizer(paths.tokenizer)
    tokens_dir = Path(paths.tokens)
    train = load_tokens(tokens_dir / "train.parquet", expected_fingerprint=tok_config["fingerprint"])
    val = load_tokens(tokens_dir / "val.parquet", expected_fingerprint=tok_config["fingerprint"])
    tokenizer.to(accelerator.device)
    if released is None:
        arch_config = model_config(cfg, tok_config, train.token_layout, train.vocab_size, train.seq_len)
        raw_model = build_ar(cfg.arch, arch_config, tokenizer.quantizer if cfg.arch == "var" else None)
    else:
        raw_model, released_init = import_model(cfg, released, tok_config, tokenizer)
        arch_config = raw_model.config_dict()
    inputs = [paths.tokens, paths.tokenizer, *([released] if released else []), *([champion[0]] if champion else [])]
    resume = Resume(accelerator, resume_dir(paths.resume, STAGE, cfg, inputs), cfg.save_every)
    # a resumed run holds its start point in its state (the same champion: it is one of the inputs)
    fresh_champion_start = champion is not None and not resume.has_state()
    init = champion_start(*champion, raw_model, tok_config["fingerprint"]) if fresh_champion_start else None
    init = released_init if released else init
    raw_model.to(accelerator.device)
    optimizer = torch.optim.AdamW(raw_model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    model = compile_model(model, cfg.compile)  # after wrapping: see core.training.compile_model
    ema = EMA(raw_model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    start, history = resume.restore()
    # the partly filled logging window is part of the state, so a resumed run logs the same rows
    history = history or {"train": [], "val": [], "window": {"steps": 0, "loss": 0.0, "acc": 0.0}, "init": init}
    init = history.get("init")
    window = history["window"]
    peak = matmul_peak_flops(accelerator.device, torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32)
    flops_per_step = raw_model.flops_per_token() * cfg.batch_size * train.seq_len
    params = sum(p.numel() for p in raw_model.parameters())
    accelerator.print(
        f"{STAGE}: {cfg.arch} {params / 1e6:.2f}M params, {len(train.tokens_NL)} train sequences of "
        f"{train.seq_len} tokens, {world} process(es), measured peak {peak / 1e12:.3f} TFLOP/s per process"
    )
    tracker.log_params({"pretrain.params": params, "pretrain.processes": world})
    tags = {k: v for k, v in (init or {"from": "scratch"}).items() if isinstance(v, (str, int, float, bool))}
    tracker.set_tags({f"arpipe.init.{k}": v for k, v in tags.items()})

    bar = step_bar(STAGE, start, cfg.steps, accelerator)
    window_start, timed_steps = time.perf_counter(), 0
    for step in bar:
        lr = warmup_decay_lr(step, steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                             min_lr_ratio=cfg.min_lr_ratio, decay=cfg.decay)  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens_BL, labels_B = batch_at(cfg, train.tokens_NL, train.labels_N, step)
        # Labels are dropped for the whole global batch before it is split, so any process count
        # and accumulation drop the same ones.
        labels_B = raw_model.drop_labels(labels_B, step_generator(cfg.seed, step, purpose=4))
        micro = list(
            zip(tokens_BL[rank::world].chunk(cfg.grad_accum), labels_B[rank::world].chunk(cfg.grad_accum), strict=True)
        )
        step_loss = step_acc = 0.0
        for i, (tokens_bl, labels_b) in enumerate(micro):
            sync = accelerator.no_sync(model) if i < len(micro) - 1 else contextlib.nullcontext()
            with sync:
                tokens_bl, labels_b = tokens_bl.to(accelerator.device), labels_b.to(accelerator.device)
                with accelerator.autocast():
                    logits_blV = model(tokens_bl, labels_b, label_dropout=False)
                loss = token_loss(logits_blV, tokens_bl)
                check_finite({"loss": loss}, step, resume)
                accelerator.backward(loss / len(micro))
            step_loss += float(loss.detach()) / len(micro)
            step_acc += float((logits_blV.detach().argmax(-1) == tokens_bl).float().mean()) / len(micro)
        grad_norm = accelerator.clip_grad_norm_(
            model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(raw_model)
        window["loss"] += step_loss
        window["acc"] += step_acc
        window["steps"] += 1
        timed_steps += 1

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = timed_steps * cfg.batch_size * train.seq_len / elapsed
            row = {
                "step": done,
                "loss": window["loss"] / window["steps"],
                "token_acc": window["acc"] / window["steps"],
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_s,
                "mfu": timed_steps * flops_per_step / elapsed / (peak * world),
            }
            history["train"].append(row)
            tracker.log_metrics({f"train/{k}": v for k, v in row.items() if k != "step"}, step=done)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['token_acc']:.3f}")
            window.update(steps=0, loss=0.0, acc=0.0)
            window_start, timed_steps = time.perf_counter(), 0
        if accelerator.is_main_process and (done % cfg.eval_every == 0 or done == cfg.steps):
            scores = evaluate(_weights_for_output(raw_model, ema), val.tokens_NL, val.labels_N, val.token_layout)
            history["val"].append(
                {"step": done, "val_loss": scores["val_loss"], "val_token_acc": scores["val_token_acc"]}
            )
            tracker.log_metrics(flatten_metrics(scores, "val/"), step=done)
        if accelerator.is_main_process and cfg.sample_every and done % cfg.sample_every == 0 and done < cfg.steps:
            grid = sample_grid(_weights_for_output(raw_model, ema), tokenizer, cfg)
            tracker.log_image(grid, f"samples/step_{done:07d}.png")
        resume.step_done(done, history)
        if on_step is not None:
            on_step(done)

    metrics: dict = {}
    if accelerator.is_main_process:
        final = _weights_for_output(raw_model, ema)
        metrics, speed = _write_outputs(cfg, paths, final, arch_config, tok_config, train, val, tokenizer, history)
        metrics.update(params=params, processes=world)
        speed["peak_tflops_per_process"] = peak / 1e12
        # timings go to MLflow and the log, not to metrics/pretrain.json (which stays deterministic)
        tracker.log_metrics({**flatten_metrics(metrics), **flatten_metrics(speed, "speed/")})
        tracker.log_image(np.asarray(_read_png(Path(paths.models) / OUT_NAME / "samples.png")), "samples.png")
        print(
            f"{STAGE}: val loss {metrics['val_loss']:.3f}, token acc {metrics['val_token_acc']:.3f}, "
            f"{speed['tokens_per_s']:.0f} tokens/s, MFU {speed['mfu']:.1%}, "
            f"sampling {speed['sample_images_per_s']:.0f} images/s -> {Path(paths.models) / OUT_NAME}"
        )
    resume.finish()
    return metrics


def import_model(cfg: Config, file: Path, tok_config: dict, tokenizer):
    """The released model in ``file``, paired with the tokenizer (vocabulary = codebook, one class
    name per class), as an arpipe module, and what config.json records about it (``init``)."""
    state, found = load_released(file)
    try:
        state_dict, config, rebuilt = released_checkpoint(
            cfg.released.format,
            state,
            model=cfg.released.model or None,
            heads=cfg.released.heads or None,
            tokenizer=tok_config,
        )
    except ReleasedFormatError as exc:
        raise ImportFailed(f"{STAGE}.released: {file}: {exc}") from None
    if config.get("arch") != cfg.arch:
        what = f"a {config['arch']} model" if "arch" in config else "a tokenizer"
        raise ImportFailed(f"{STAGE}.arch is {cfg.arch}, but {file.name} ({cfg.released.format}) holds {what}")
    model = merge_model(cfg.model, config["model"], FINETUNE_KEYS, f"{STAGE}.model", file)
    raw_model = build_ar(cfg.arch, model, tokenizer.quantizer if cfg.arch == "var" else None)
    raw_model.load_state_dict(state_dict)
    print(f"{STAGE}: starting from {file.name} ({cfg.released.format}), {cfg.steps} fine-tuning steps")
    return raw_model, {"from": "released", **source_entry(file, cfg.released.format, cfg.released.model or None,
                                                          found, rebuilt)}  # fmt: skip


def champion_folder(cfg: Config, paths: Paths) -> tuple[Path, dict]:
    """(``paths.models/init``, its ``init.json``): the champion ``init_model`` fetched, refused when
    that folder is missing or was written for other params."""
    folder = start_point_dir(paths.models)
    expected = {"init_from": "champion", "arch": cfg.arch, "init_version": cfg.init_version}
    return folder, read_start_point(folder, expected)


def champion_start(folder: Path, record: dict, raw_model, tokenizer_fingerprint: str) -> dict:
    """Load the champion in ``folder`` (``init.json`` = ``record``) into ``raw_model``; returns what
    was loaded, recorded in config.json (``init``) and as ``arpipe.init.*`` run tags."""
    state, config = read_checkpoint(folder, stage="init_model")
    what = f"{record['model']} v{record['version']}"
    check_state_fits(state, raw_model.state_dict(), what)
    raw_model.load_state_dict(state)
    same_tokenizer = config.get("tokenizer_fingerprint") == tokenizer_fingerprint
    print(f"{STAGE}: starting from {what} (fingerprint {config['fingerprint'][:12]})")
    if not same_tokenizer:
        print(f"{STAGE}: warning: {what} was trained on another tokenizer; its token ids mean other codes here")
    return {"from": "champion", "model": record["model"], "version": record["version"],
            "fingerprint": config["fingerprint"], "run_id": record["run_id"],
            "same_tokenizer": same_tokenizer}  # fmt: skip


def _weights_for_output(raw_model, ema: EMA | None):
    """The model to evaluate and write: a copy carrying the EMA weights, or the model itself."""
    if ema is None:
        return raw_model
    import copy

    averaged = copy.deepcopy(raw_model)
    ema.copy_to(averaged)
    return averaged


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _write_outputs(cfg, paths, model, arch_config, tok_config, train, val, tokenizer, history) -> tuple[dict, dict]:
    """Write the model folder and the plots; return (deterministic metrics, speed figures)."""
    out_dir = Path(paths.models) / OUT_NAME
    config = {
        "arch": cfg.arch,
        "model": model.config_dict(),
        "stage": STAGE,
        "tokenizer_fingerprint": tok_config["fingerprint"],
        "token_layout": train.token_layout,
        "class_names": tok_config["class_names"],
        "image_size": tok_config["image_size"],
        "weights": "released" if not history["train"] else "ema" if cfg.ema_decay > 0 else "final",
        "stage_config": stage_config(cfg),
        **({"init": history["init"]} if history.get("init") else {}),
    }
    write_checkpoint(out_dir, model.state_dict(), config)
    start = time.perf_counter()
    grid = sample_grid(model, tokenizer, cfg)
    sample_seconds = time.perf_counter() - start
    save_png(grid, out_dir / "samples.png")
    plots = Path(paths.plots) / STAGE
    plots.mkdir(parents=True, exist_ok=True)
    _write_csv(plots / "train.csv", TRAIN_COLUMNS, history["train"])
    _write_csv(plots / "val.csv", ("step", "val_loss", "val_token_acc"), history["val"])
    scores = evaluate(model, val.tokens_NL, val.labels_N, val.token_layout)
    last = history["train"][-1] if history["train"] else None  # None: imported, not trained (steps 0)
    num_samples = arch_config["num_classes"] * cfg.samples_per_class * len(cfg.sample_cfg_scales)
    timed = history["train"][1:] or history["train"]  # the first window includes warm-up
    trained = {"train_loss": last["loss"], "train_token_acc": last["token_acc"]} if last else {}
    metrics = {**scores, **trained, "steps": cfg.steps}
    speed = {
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in timed])) if timed else 0.0,
        "mfu": float(np.mean([r["mfu"] for r in timed])) if timed else 0.0,
        "sample_images_per_s": num_samples / sample_seconds,
    }
    return metrics, speed


def stage_config(cfg: Config) -> dict[str, Any]:
    """config.json's ``stage_config``. Without a released import it leaves out ``released``, so
    the files of a scratch or champion start stay byte-identical to those from before it existed."""
    config = recorded_config(cfg)
    if cfg.init_from != "released":
        del config["released"]
    return config


def _write_csv(path: Path, columns, rows) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)


def main() -> None:
    stage_main(STAGE, Config, run, is_main_process=process_state().is_main_process)


if __name__ == "__main__":
    main()
