"""distill2: the teacher -> a one-step DD2 generator by conditional score distillation (either family).

Reads ``paths.distill/pairs.parquet`` only for what ``distill_pairs`` decided: the teacher (its name
and fingerprint), its sampling distribution (guidance scale and schedule, temperature, top-k/p, so DD1
and DD2 share one target) and its exact samples (the tokens), which serve as GTS prefixes (no
data beyond the teacher; the pairs' noise is not used). The math is ``models/dd2.py``.

1. GTS warm-up (``gts_steps``): the AR-diffusion model (teacher trunk + new ``ScoreHead``; the
   teacher's logits head is dropped) regresses the teacher's exact denoiser D_T of the noised
   next-token mixture at every position of the pairs' sequences, ``t ~ U[t_min, t_max]`` per
   position.
2. CSD (``steps`` generator updates): the generator starts as the GTS model (trunk with DD1's
   noise plumbing, head evaluated at ``(t_gen·ε_i, t_gen)``), the fake score network continues
   from it. Per step: x̂ = G(y, ε) in one pass; q̂ = nearest codewords; the teacher's sampling
   distribution at every position given q̂ (one teacher-forced pass, two with guidance);
   ``fake_updates`` FCS steps of the fake network on sg(x̂), then one CSD step of G (``loss``:
   DMD's gradient by default, the SiD form on request) with the prefix stop-gradded (it enters
   only through q̂). EMA of G is written.

Choices where the paper is silent (reference/dd2.md "unknown"), or where we measured: the DMD
form by default, since the paper's SiD form (implemented, ``loss: sid``) drifts towards uniform on
the one-token toy; x0-space losses with unit weight;
``t ~ U[0.02, 0.98]`` per position; SiD α 1.2; ω = 1/mean|x̂ − D_T| per sequence; Adam betas (0, 0.999) for
both networks (DMD2/SiD); 1 fake update per generator update; GTS prefixes = the pairs' teacher
samples; the generator's head reads ``t_gen·ε_i`` at ``t_gen`` 0.5 (at t = 1 D_T ignores x, so
the head would ignore its noise); tokens for the teacher = nearest codewords of x̂; images decode
the unquantised vectors (as DD1).

Writes ``paths.models/distilled2`` in the DD1 student's format (``"distilled": true``, ``arch``,
``model``, ``dd`` with split 0, plus ``dd2``: head and t_gen), so ``evaluate`` and ``arpipe
sample`` load it through ``dd_student.student_from_state``; ``plots/distill2/{gts,csd}.csv``;
``metrics/distill2.json`` with the generator's agreement with the teacher on ``eval_count``
samples: mean per-token teacher NLL of its tokens (given its own prefix) against the teacher's
entropy there, codes used, distance to the nearest codeword. Resumes to byte-identical weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from core.checkpoint import read_checkpoint, teacher_cfg_scale, write_checkpoint
from core.config import Paths
from core.finetune import end_step, optimizer_step, output_weights, restore_or_start, start_accelerator
from core.images import image_grid, save_png
from core.metrics import write_rows_csv
from core.pair_store import load_pairs, read_meta
from core.stage import stage_main
from core.training import (
    EMA,
    add_to_window,
    check_finite,
    log_window,
    new_history,
    process_state,
    step_bar,
    step_generator,
)
from models.ar import ar_from_state, tokenizer_from_state
from models.dd import code_space, nearest_codewords, tokens_per_step
from models.dd2 import CSD_LOSSES, ar_diffusion_from_teacher, fcs_loss, generator_from_gts, gts_loss, per_position
from models.dd2_teacher import TeacherSampler, agreement, noised, token_statistics
from models.dd_student import sample_distilled_images
from models.sampling import family_filters, guidance_per_step

STAGE = "distill2"
OUT_NAME = "distilled2"
PAIRS_FILE = "pairs.parquet"
GTS_COLUMNS = ("step", "gts_loss", "lr", "grad_norm")
CSD_COLUMNS = ("step", "csd_loss", "fcs_loss", "gen_nll", "teacher_entropy", "codes_used", "lr", "grad_norm")


@dataclass(frozen=True, kw_only=True)
class Config:
    gts_steps: int = 60
    """GTS warm-up steps of the AR-diffusion model (teacher trunk + score head) on the exact score."""
    steps: int = 90
    """CSD generator updates (each after ``fake_updates`` fake-score updates)."""
    batch_size: int = 32
    """Sequences per step (GTS: pairs' rows; CSD: generated), over all processes."""
    gts_lr: float = 3e-4
    """AdamW lr of the GTS warm-up (constant after ``warmup_steps``)."""
    lr: float = 1e-3
    """Generator lr (constant after warm-up). Small digits run (README): 2e-5 / 2e-4 / 1e-3 gave
    one-step FID 33.2 / 30.1 / 27.5 after 300 CSD steps."""
    fake_lr: float = 1e-3
    """Fake-score network lr during CSD (constant)."""
    warmup_steps: int = 20
    """Linear lr warm-up of each phase."""
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Max global gradient norm per network (0 = no clipping)."""
    fake_updates: int = 1
    """Fake-score updates per generator update (SiD 1, DMD2 up to 5)."""
    loss: Literal["sid", "dmd"] = "dmd"
    """Generator loss: ``dmd`` (DMD's reverse-KL gradient) or ``sid`` (the paper's SiD form). On
    the one-token toy (tests/models/test_dd2.py) SiD drifts towards uniform (χ² 308 / 123 at α
    1.2 / 1.0 against p = .4/.3/.2/.1, from 115 at init) where DMD matches p (χ² 6.3)."""
    alpha: float = 1.2
    """SiD's α."""
    t_min: float = 0.02
    t_max: float = 0.98
    """Noise levels t ~ U[t_min, t_max], one per position (x_t = (1 − t)x_0 + tε)."""
    t_gen: float = 0.5
    """The generator's head reads (t_gen·ε_i, t_gen)."""
    head_width: int = 256
    head_depth: int = 3
    """Score head: AdaLN residual MLP blocks of this width."""
    ema_decay: float = 0.99
    """EMA of the generator, written as the model (0 = the last weights)."""
    denoiser_chunk: int = 4096
    """Rows of the V-wide posterior computed at a time (memory: chunk·V floats)."""
    eval_count: int = 500
    """Generated samples for the final agreement metrics (0 = none)."""
    mixed_precision: Literal["no", "bf16"] = "no"
    seed: int = 0
    log_every: int = 25
    save_every: int = 100
    """Steps (GTS + CSD) between resume states (0 = never)."""
    samples_per_class: int = 8
    launcher: str = ""
    """accelerate config file to run under; "" = this process."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "samples_per_class", "fake_updates", "head_width",
                     "head_depth", "denoiser_chunk"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{STAGE}.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gts_steps", "save_every", "warmup_steps", "eval_count"):
            if getattr(self, name) < 0:
                raise ValueError(f"{STAGE}.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.t_min < self.t_max < 1:
            raise ValueError(f"{STAGE}.t_min/t_max must satisfy 0 < t_min < t_max < 1")
        if not 0 < self.t_gen <= 1:
            raise ValueError(f"{STAGE}.t_gen must be in (0, 1], got {self.t_gen}")
        if min(self.lr, self.gts_lr, self.fake_lr) <= 0 or self.grad_clip < 0:
            raise ValueError(f"{STAGE}: lr, gts_lr and fake_lr must be > 0 and grad_clip >= 0")
        if not (self.ema_decay == 0 or 0 < self.ema_decay < 1):
            raise ValueError(f"{STAGE}.ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay}")


def load_teacher(cfg: Config, paths: Paths):
    """(TeacherSampler, teacher config, pairs, tokenizer, tokenizer config); refuses a teacher or
    tokenizer that does not fit."""
    pairs_path = Path(paths.distill) / PAIRS_FILE
    meta = read_meta(pairs_path)
    tok_state, tok_config = read_checkpoint(paths.tokenizer, stage="train_tokenizer")
    tokenizer = tokenizer_from_state(tok_state, tok_config)
    teacher_dir = Path(paths.models) / meta["teacher"]
    state, config = read_checkpoint(teacher_dir, stage=f"the stage that writes {meta['teacher']}")
    if config["tokenizer_fingerprint"] != tok_config["fingerprint"]:
        raise ValueError(f"{STAGE}: paths.tokenizer is not the tokenizer the teacher {teacher_dir} was trained on")
    pairs = load_pairs(pairs_path, expected_teacher_fingerprint=config["fingerprint"])
    try:
        codebook_VD, _ = code_space(tokenizer)
    except (ValueError, AttributeError) as error:
        raise ValueError(
            f"{STAGE}: paths.tokenizer has no codebook the teacher's score can be taken in ({error})"
        ) from None
    teacher = ar_from_state(state, config, tokenizer).requires_grad_(False)
    if codebook_VD.shape[0] != teacher.config.vocab_size or codebook_VD.shape[1] != meta["code_dim"]:
        raise ValueError(
            f"{STAGE}: paths.tokenizer's codebook {tuple(codebook_VD.shape)} does not match the teacher's "
            f"vocabulary {teacher.config.vocab_size} / the pairs' code_dim {meta['code_dim']}"
        )
    sampling = meta["stage_config"]
    arch = config["arch"]
    guidance = guidance_per_step(teacher_cfg_scale(sampling), sampling.get("guidance_schedule", "constant"),
                                 arch=arch, steps=teacher.steps)  # fmt: skip
    top_k, top_p = family_filters(sampling["top_k"], sampling["top_p"], arch=arch, vocab_size=teacher.config.vocab_size)
    guidance_L = per_position(guidance, tokens_per_step(teacher))
    sampler = TeacherSampler(
        teacher, guidance_L, sampling["temperature"], top_k, top_p, codebook_VD, cfg.denoiser_chunk
    )
    return sampler, config, pairs, tokenizer, tok_config


def _lr(step: int, lr: float, warmup_steps: int) -> float:
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


def _groups(model, weight_decay):
    return [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in model.param_groups(weight_decay)]


def run(cfg: Config, paths: Paths, tracker, on_step=None) -> dict:
    """GTS, then CSD; write the generator. ``on_step(step)`` runs after each step (tests crash there)."""
    accelerator = start_accelerator(STAGE, cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    teacher, teacher_config, pairs, tokenizer, tok_config = load_teacher(cfg, paths)
    device = accelerator.device
    teacher.model.to(device)
    teacher.codebook_VD = teacher.codebook_VD.to(device)
    tokenizer.to(device)
    arch = teacher_config["arch"]
    raw_fake = ar_diffusion_from_teacher(teacher.model, teacher.codebook_VD.shape[1], cfg.head_width, cfg.head_depth)
    raw_fake.train(False)  # deterministic trunks (no dropout): the score is a function of its inputs
    raw_gen = generator_from_gts(arch, raw_fake, teacher.codebook_VD, cfg.t_gen).train(False)
    fake_opt = torch.optim.AdamW(_groups(raw_fake, cfg.weight_decay), lr=cfg.gts_lr, betas=cfg.betas)
    gen_opt = torch.optim.AdamW(_groups(raw_gen, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    fake, gen, fake_opt, gen_opt = accelerator.prepare(raw_fake, raw_gen, fake_opt, gen_opt)
    ema = EMA(raw_gen, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    teacher_dir = Path(paths.models) / pairs.meta["teacher"]
    inputs = [Path(paths.distill) / PAIRS_FILE, paths.tokenizer, teacher_dir]
    fresh = {"gts": new_history(["gts_loss"]), "csd": new_history(CSD_COLUMNS[1:6])}
    resume, start, history = restore_or_start(accelerator, STAGE, cfg, paths.resume, inputs, fresh)
    total = cfg.gts_steps + cfg.steps
    accelerator.print(
        f"{STAGE}: {arch} teacher {teacher_dir} ({teacher.model.config.seq_len} tokens, {teacher.codebook_VD.shape[0]} "
        f"codes in {teacher.codebook_VD.shape[1]} dims), {cfg.gts_steps} GTS steps then {cfg.steps} CSD steps "
        f"({cfg.loss}, {cfg.fake_updates} fake update(s) each), batch {cfg.batch_size}"
    )
    num_classes, L, D = teacher.model.num_classes, teacher.model.config.seq_len, teacher.codebook_VD.shape[1]
    bar = step_bar(STAGE, start, total, accelerator)
    for step in bar:
        if step < cfg.gts_steps:
            row = _gts_step(cfg, step, teacher, pairs, fake, fake_opt, raw_fake, accelerator, rank, world, resume)
            window = history["gts"]
        else:
            csd_step = step - cfg.gts_steps
            if csd_step == 0:  # the generator starts as the GTS model (the paper's init)
                raw_gen.student.backbone.load_state_dict(raw_fake.trunk.state_dict())
                raw_gen.head.load_state_dict(raw_fake.head.state_dict())
                if ema is not None:
                    ema.shadow = {n: p.detach().float().clone() for n, p in raw_gen.named_parameters()}
            labels_B = torch.randint(num_classes, (cfg.batch_size,), generator=step_generator(cfg.seed, step, 1))
            noise_BLD = torch.randn(cfg.batch_size, L, D, generator=step_generator(cfg.seed, step, 2))
            row = _csd_step(cfg, step, csd_step, teacher, gen, fake, raw_gen, raw_fake, gen_opt, fake_opt, accelerator,
                            labels_B[rank::world].to(device), noise_BLD[rank::world].to(device), resume)  # fmt: skip
            if ema is not None:
                ema.update(raw_gen)
            window = history["csd"]
        lr = row.pop("lr")
        grad_norm = row.pop("grad_norm")
        add_to_window(window, row)
        done = step + 1
        if done % cfg.log_every == 0 or done in (cfg.gts_steps, total):
            if window["window"]["steps"]:
                logged = log_window(window, tracker, step=done, lr=lr, grad_norm=grad_norm)
                bar.set_postfix({k: f"{v:.4f}" for k, v in logged.items() if k in ("gts_loss", "csd_loss", "gen_nll")})
        end_step(resume, done, history, on_step)

    metrics: dict = {}
    if accelerator.is_main_process:
        generator = output_weights(raw_gen, ema).eval()
        metrics = _write_outputs(cfg, paths, generator, teacher, teacher_config, pairs, tok_config, tokenizer, history)
        tracker.log_metrics(metrics)
        tracker.log_image(_samples(generator, tokenizer, cfg), "samples.png")
        print(f"{STAGE}: generator teacher-NLL {metrics.get('gen_nll_per_token', float('nan')):.3f} vs teacher "
              f"entropy {metrics.get('teacher_entropy_per_token', float('nan')):.3f} nats/token, "
              f"{metrics.get('codes_used', 0)} codes used -> {Path(paths.models) / OUT_NAME}")  # fmt: skip
    resume.finish()
    return metrics


def _gts_step(cfg, step, teacher, pairs, fake, fake_opt, raw_fake, accelerator, rank, world, resume) -> dict:
    """One GTS step on a random batch of the pairs' teacher samples."""
    device = accelerator.device
    index = torch.randint(len(pairs.labels_N), (cfg.batch_size,), generator=step_generator(cfg.seed, step, 3))
    index = index[rank::world].numpy()
    tokens_bL = torch.from_numpy(pairs.tokens_NL[index].astype(np.int64)).to(device)
    labels_b = torch.from_numpy(pairs.labels_N[index].astype(np.int64)).to(device)
    lr = _lr(step, cfg.gts_lr, cfg.warmup_steps)
    for group in fake_opt.param_groups:
        group["lr"] = lr
    log_probs_bLV = teacher.log_probs(tokens_bL, labels_b)
    x_t, t_bL = noised(teacher.codebook_VD[tokens_bL], cfg.t_min, cfg.t_max, step_generator(cfg.seed, step, 4))
    target = teacher.denoise(x_t, t_bL, log_probs_bLV)
    with accelerator.autocast():
        pred = fake(x_t, t_bL, tokens_bL, labels_b)
    loss = gts_loss(pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1]))
    check_finite({f"{STAGE}.gts_loss": loss}, step, resume)
    grad_norm = optimizer_step(accelerator, fake, fake_opt, loss, cfg.grad_clip)
    return {"gts_loss": float(loss.detach()), "lr": lr, "grad_norm": grad_norm}


def _csd_step(cfg, step, csd_step, teacher, gen, fake, raw_gen, raw_fake, gen_opt, fake_opt, accelerator,
              labels_b, noise_bLD, resume) -> dict:  # fmt: skip
    """``fake_updates`` FCS steps on sg(x̂), then one CSD step of the generator."""
    lr, fake_lr = _lr(csd_step, cfg.lr, cfg.warmup_steps), cfg.fake_lr
    for group in gen_opt.param_groups:
        group["lr"] = lr
    for group in fake_opt.param_groups:
        group["lr"] = fake_lr
    with accelerator.autocast():
        x_hat = gen(noise_bLD, labels_b).float()
    B, L, D = x_hat.shape
    tokens_bL = nearest_codewords(x_hat.detach().reshape(-1, D), teacher.codebook_VD).view(B, L)
    log_probs_bLV = teacher.log_probs(tokens_bL, labels_b)
    for k in range(cfg.fake_updates):
        x_t, t_bL = noised(x_hat.detach(), cfg.t_min, cfg.t_max, step_generator(cfg.seed, step, 10 + k))
        with accelerator.autocast():
            pred = fake(x_t, t_bL, tokens_bL, labels_b)
        fake_loss = fcs_loss(pred.reshape(-1, D), x_hat.detach().reshape(-1, D))
        check_finite({f"{STAGE}.fcs_loss": fake_loss}, step, resume)
        optimizer_step(accelerator, fake, fake_opt, fake_loss, cfg.grad_clip)
    # generator: both denoisers frozen but differentiable in x_t; the prefix enters only via q̂ (no grad)
    x_t, t_bL = noised(x_hat, cfg.t_min, cfg.t_max, step_generator(cfg.seed, step, 5))
    with torch.no_grad():
        h_bLC = raw_fake.hidden(tokens_bL, labels_b)
    frozen = {name: p.detach() for name, p in raw_fake.head.named_parameters()}
    fake_x0 = torch.func.functional_call(raw_fake.head, frozen, (x_t, t_bL, h_bLC))
    real_x0 = teacher.denoise(x_t, t_bL, log_probs_bLV)
    loss = CSD_LOSSES[cfg.loss](x_hat, real_x0, fake_x0, **({"alpha": cfg.alpha} if cfg.loss == "sid" else {}))
    check_finite({f"{STAGE}.csd_loss": loss}, step, resume)
    grad_norm = optimizer_step(accelerator, gen, gen_opt, loss, cfg.grad_clip)
    nll, inside, entropy = token_statistics(log_probs_bLV, tokens_bL)
    return {"csd_loss": float(loss.detach()), "fcs_loss": float(fake_loss.detach()), "gen_nll": nll / max(inside, 1),
            "teacher_entropy": entropy / tokens_bL.numel(), "codes_used": float(tokens_bL.unique().numel()), "lr": lr,
            "grad_norm": grad_norm}  # fmt: skip


def _samples(generator, tokenizer, cfg: Config) -> np.ndarray:
    labels = torch.arange(generator.num_classes).repeat_interleave(cfg.samples_per_class)
    images = sample_distilled_images(generator, tokenizer, labels, steps=1, seed=cfg.seed).numpy()
    return image_grid(images, cfg.samples_per_class)


def _write_outputs(cfg, paths, generator, teacher, teacher_config, pairs, tok_config, tokenizer, history) -> dict:
    out_dir = Path(paths.models) / OUT_NAME
    meta = pairs.meta
    config = {
        "arch": teacher_config["arch"],
        "model": teacher_config["model"],
        "dd": dataclasses.asdict(generator.dd),
        "dd2": generator.config_dict(),
        "distilled": True,
        "stage": STAGE,
        "tokenizer_fingerprint": tok_config["fingerprint"],
        "token_layout": teacher_config["token_layout"],
        "class_names": teacher_config["class_names"],
        "image_size": teacher_config["image_size"],
        "weights": "ema" if cfg.ema_decay > 0 else "final",
        "teacher": {
            "name": meta["teacher"],
            "fingerprint": teacher_config["fingerprint"],
            "steps": len(generator.step_sizes),
            "cfg_scale": teacher_cfg_scale(meta["stage_config"]),
            "guidance_schedule": meta["stage_config"].get("guidance_schedule", "constant"),
        },
        "sampling": {
            "cfg_scale": teacher_cfg_scale(meta["stage_config"]),
            **{k: meta["stage_config"][k] for k in ("guidance_schedule", "temperature", "top_k", "top_p")},
        },
        "stage_config": dataclasses.asdict(cfg),
    }
    write_checkpoint(out_dir, generator.state_dict(), config)
    save_png(_samples(generator, tokenizer, cfg), out_dir / "samples.png")
    write_rows_csv(Path(paths.plots) / STAGE / "gts.csv", GTS_COLUMNS, history["gts"]["train"])
    write_rows_csv(Path(paths.plots) / STAGE / "csd.csv", CSD_COLUMNS, history["csd"]["train"])
    metrics = {"gts_steps": cfg.gts_steps, "steps": cfg.steps}
    for phase, key in (("gts", "gts_loss"), ("csd", "csd_loss"), ("csd", "fcs_loss")):
        if history[phase]["train"]:
            metrics[f"train_{key}"] = history[phase]["train"][-1][key]
    if cfg.eval_count:
        metrics.update(agreement(generator, teacher, cfg.eval_count, cfg.seed))
        metrics["pairs_codes_used"] = int(len(np.unique(pairs.tokens_NL)))
    return {k: v for k, v in metrics.items() if not isinstance(v, float) or math.isfinite(v)}


def main() -> None:
    stage_main(STAGE, Config, run, is_main_process=process_state().is_main_process)


if __name__ == "__main__":
    main()
