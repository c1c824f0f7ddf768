"""train_tokenizer: shard images -> a trained image tokenizer (``vq`` or ``msvq``).

Reads the train and val splits of ``paths.shards`` into memory (see ``core/shards.py``), trains
``models.tokenizers.build_tokenizer(kind, model)`` under ``accelerate`` with an L2 (or L1)
reconstruction loss + the quantizer's codebook/commitment losses, an optional PatchGAN hinge loss
from ``disc_start``, an optional LPIPS-style perceptual loss on a frozen VGG16 whose weights come
from a local file (``perceptual_weights``; nothing is downloaded), and dead-code restarts every
step through ``update_codebook``. Writes:

- ``paths.tokenizer/model.safetensors`` + ``config.json`` (kind, model config, token layout,
  codebook size, seq_len, image size, class names, this stage's config, fingerprint)
- ``paths.plots/train_tokenizer/loss.csv`` and ``metrics/train_tokenizer.json`` (val PSNR/MSE, usage:
  the training EMA and counted over the whole train set, and ``val_recon_fid_pixels``: a cheap
  stand-in for the reconstruction FID that ``evaluate`` measures later in the evalnet's space, FID
  between the val images and their reconstructions on pixels area-averaged to at most 16x16,
  0 = the same distribution)

With ``init_from: released`` the tokenizer starts from a released checkpoint file
(``released.file`` under ``paths.released``, converted by ``models.released``; its image size is
the shards'): ``steps: 0`` writes it as is (an import, with the same val metrics), ``steps > 0``
fine-tunes it on the shards.

Resumes from ``paths.resume`` after a crash. Run by DVC as ``python -m stages.train_tokenizer``
(one process) or via ``accelerate launch -m stages.train_tokenizer`` (several).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from core.checkpoint import write_checkpoint
from core.config import Paths
from core.metrics import flatten_metrics
from core.released import ImportFailed, ReleasedFile, load_released, merge_model, source_entry
from core.shards import class_names, load_split
from core.stage import stage_main
from core.training import (
    Resume,
    build_accelerator,
    check_finite,
    process_state,
    resume_dir,
    seed_everything,
    step_bar,
    step_generator,
)
from models.discriminator import DiscriminatorConfig, PatchDiscriminator, hinge_d_loss, hinge_g_loss
from models.metrics import fid_from_features
from models.perceptual import PerceptualLoss
from models.released import FORMATS, ReleasedFormatError, released_checkpoint
from models.tokenizers import build_tokenizer, tokenizer_config

STAGE = "train_tokenizer"
PIXEL_FID_SIDE = 16
"""Images are area-averaged to at most this side for ``val_recon_fid_pixels`` (D <= 768 for RGB)."""
DEFAULT_MODEL = {  # for 16x16 digits: 4x4 = 16 tokens, 256 codes, ~0.26M params, ~30 s on 2 CPU cores
    "base_channels": 16,
    "channel_multipliers": [1, 2, 2],
    "attention": False,
    "z_channels": 32,
    "codebook_size": 256,
    "restart_every": 25,
}
LOSS_TERMS = ("loss", "recon", "codebook", "commit", "entropy", "g_loss", "d_loss")
FINETUNE_KEYS = frozenset({"commitment_weight", "entropy_weight", "entropy_temperature", "usage_momentum",
                           "dead_code_threshold", "restart_every", "restart_max_total_share",
                           "normalization_momentum"})  # fmt: skip
"""``model`` keys that may differ from a released tokenizer's when fine-tuning it (no weight shape
or computation of the imported encoder/decoder depends on them)."""
# Model keys the stage takes from the shards, never from params.yaml (as train_evalnet does).
DERIVED_KEYS = ("image_size", "image_channels")


@dataclass(frozen=True, kw_only=True)
class Config:
    kind: Literal["vq", "msvq"] = "vq"
    """``vq``: single-scale LlamaGen-style; ``msvq``: multi-scale residual VAR-style."""
    model: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_MODEL))
    """Keys of the kind's config (models/vq.py VQConfig, models/msvq.py MSVQConfig), checked strictly;
    image_size and image_channels come from the shards."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 64
    """Images per step, over all processes."""
    lr: float = 2e-3
    """Peak AdamW learning rate; cosine decay to 10% over ``steps``."""
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Max gradient norm (0 = no clipping)."""
    seed: int = 0
    recon_loss: Literal["l2", "l1"] = "l2"
    disc_weight: float = 0.0
    """Weight of the PatchGAN hinge loss for the tokenizer (0 = no discriminator)."""
    disc_start: int = 0
    """Step from which the discriminator trains and its loss counts."""
    perceptual_weights: str = ""
    """Local VGG16 weights for an LPIPS-style perceptual loss: a torchvision-format state_dict
    (``features.N.weight``/``.bias``) in a .pth or .safetensors file. "" = no perceptual loss.
    Nothing is downloaded."""
    perceptual_weight: float = 1.0
    """Weight of the perceptual loss (used only with ``perceptual_weights``)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = 10
    """Steps between logged loss terms (MLflow and loss.csv)."""
    eval_every: int = 150
    """Steps between val PSNR/usage evaluations (the last step is always evaluated)."""
    save_every: int = 100
    """Steps between resume states (0 = never)."""
    num_grid: int = 16
    """Val images in the originals-vs-reconstructions grid."""
    init_from: Literal["scratch", "released"] = "scratch"
    """``scratch``: random init. ``released``: the released tokenizer in ``released`` (its
    architecture; ``model`` may restate it, and change only ``FINETUNE_KEYS``); ``steps: 0``
    imports it, ``steps > 0`` fine-tunes it on the shards."""
    released: ReleasedFile = field(default_factory=ReleasedFile)
    """With ``init_from: released``: ``format`` (llamagen-vq | var-vqvae), ``file`` (under
    ``paths.released``) and ``model`` (e.g. VQ-16; "" = from the shapes)."""

    def __post_init__(self):
        for key in DERIVED_KEYS:
            if key in self.model:
                raise ValueError(f"model.{key} is set from the shards; remove it from params.yaml")
        # unknown or mistyped model keys fail here, by name; the size checks run again at the shards' size
        tokenizer_config(self.kind, {**self.model, "image_size": fitting_image_size(self.kind, self.model)})
        if min(self.batch_size, self.log_every, self.eval_every, self.num_grid) < 1:
            raise ValueError("batch_size, log_every, eval_every and num_grid must be >= 1")
        if self.steps < (0 if self.init_from == "released" else 1):
            raise ValueError(f"steps must be >= 1 (0 = import only, with init_from: released), got {self.steps}")
        if self.init_from == "released" and self.released.format not in FORMATS:
            raise ValueError(f"released.format {self.released.format!r} is not a released format: {', '.join(FORMATS)}")
        if self.lr <= 0 or self.grad_clip < 0 or self.disc_weight < 0 or self.save_every < 0:
            raise ValueError("lr must be > 0; grad_clip, disc_weight and save_every >= 0")
        if self.perceptual_weight < 0:
            raise ValueError("perceptual_weight must be >= 0")


def fitting_image_size(kind: str, model: dict[str, Any]) -> int:
    """An image side the model keys fit (the last scale x the downsample factor), to check the keys
    before the shards are read; the real side comes from the shards."""
    fields = {f.name: f.default for f in dataclasses.fields(type(tokenizer_config(kind, {})))}
    multipliers = model.get("channel_multipliers", fields["channel_multipliers"])
    scales = model.get("scales", fields.get("scales")) or (1,)
    return int(list(scales)[-1]) * 2 ** (len(multipliers) - 1)


def run(cfg: Config, paths: Paths, tracker, on_step=None) -> dict:
    """Train and write the outs; ``on_step(step)`` runs after each step (tests use it to crash)."""
    released = cfg.released.path(paths.released, f"{STAGE}.released") if cfg.init_from == "released" else None
    accelerator = build_accelerator(cfg.mixed_precision)
    # Before seeding (its construction draws from the global RNG) and before any work; frozen,
    # never prepared, optimised or saved.
    perceptual = load_perceptual(cfg.perceptual_weights)
    if perceptual is not None:
        perceptual.to(accelerator.device)
    seed_everything(cfg.seed)
    # an import (steps 0) reads no train images: its codebook usage is counted on the val split
    train = load_split(paths.shards, "train") if cfg.steps else None
    val = load_split(paths.shards, "val")
    _, side, _, channels = (val if train is None else train).images_NHWC.shape
    init = None
    if released is None:
        raw_model = build_tokenizer(cfg.kind, {**cfg.model, "image_size": side, "image_channels": channels})
    else:  # the released architecture at the shards' image size
        raw_model, init = import_tokenizer(cfg, released, side, class_names(paths.shards))
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    disc = disc_opt = None
    if cfg.disc_weight > 0:
        layers = 2 if raw_model.config.image_size >= 16 else 1  # patch logits need >= 2x2 at the end
        raw_disc = PatchDiscriminator(
            DiscriminatorConfig(image_channels=raw_model.config.image_channels, layers=layers)
        )
        disc_opt = torch.optim.AdamW(raw_disc.parameters(), lr=cfg.lr, betas=cfg.betas)
        disc, disc_opt = accelerator.prepare(raw_disc, disc_opt)

    inputs = [paths.shards, *([cfg.perceptual_weights] if perceptual is not None else [])]
    inputs += [released] if released else []
    resume = Resume(accelerator, resume_dir(paths.resume, STAGE, cfg, inputs), cfg.save_every)
    start, history = resume.restore()
    images_NCHW = torch.from_numpy(train.images_NHWC).permute(0, 3, 1, 2).contiguous() if train is not None else None
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = step_bar(STAGE, start, cfg.steps, accelerator)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        x_BCHW = batch_at(cfg, images_NCHW, step)[rank::world].to(accelerator.device)
        adversarial = disc is not None and step >= cfg.disc_start
        with accelerator.autocast():
            recon_BCHW, quant = model(x_BCHW)
            recon = reconstruction_loss(cfg.recon_loss, recon_BCHW.float(), x_BCHW)
            g_loss = hinge_g_loss(disc(recon_BCHW)) if adversarial else recon.new_zeros(())
            loss = recon + quant.loss + cfg.disc_weight * g_loss
            if perceptual is not None:
                p_loss = perceptual(recon_BCHW.float(), x_BCHW)
                loss = loss + cfg.perceptual_weight * p_loss
        check_finite({"loss": loss}, step, resume)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        d_loss = recon.new_zeros(())
        if adversarial:
            with accelerator.autocast():
                d_loss = hinge_d_loss(disc(x_BCHW), disc(recon_BCHW.detach()))
            disc_opt.zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            disc_opt.step()
        # Usage and restarts see every process's codes, so every replica re-seeds identically.
        counts = accelerator.reduce(quant.counts, "sum") if world > 1 else quant.counts
        candidates = [accelerator.gather(c) for c in quant.candidates] if world > 1 else quant.candidates
        # No restart in the last window: a re-seeded code trains for a full window before the
        # end, and the final usage is not that of codes just zeroed.
        allow_restart = cfg.steps - (step + 1) >= raw_model.config.restart_every
        raw_model.update_codebook(counts, candidates, step_generator(cfg.seed, step, purpose=1), allow_restart)

        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            terms = [loss, recon, quant.codebook_loss, quant.commit_loss, quant.entropy_loss, g_loss, d_loss]
            logged = {name: float(value.detach()) for name, value in zip(LOSS_TERMS, terms, strict=True)}
            if perceptual is not None:
                logged["perceptual"] = float(p_loss.detach())
            history.append({"step": step + 1, **logged})
            tracker.log_metrics({f"train/{k}": v for k, v in logged.items()}, step=step + 1)
            bar.set_postfix(loss=f"{logged['loss']:.4f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            tracker.log_metrics(flatten_metrics(evaluate(raw_model, val.images_NHWC), "val/"), step=step + 1)
        resume.step_done(step + 1, history)
        if on_step is not None:
            on_step(step + 1)

    split, counted = ("val", val) if train is None else ("train", train)
    metrics = {**evaluate(raw_model, val.images_NHWC), f"{split}_usage": data_usage(raw_model, counted.images_NHWC)}
    metrics["steps"] = cfg.steps
    if accelerator.is_main_process:
        _write_outputs(cfg, paths, raw_model, class_names(paths.shards), history, init)
        tracker.log_metrics(flatten_metrics(metrics))
        tracker.log_image(recon_grid(raw_model, val.images_NHWC[: cfg.num_grid]), "reconstructions.png")
        recon_fid = metrics.get("val_recon_fid_pixels")
        print(
            f"{STAGE}: val PSNR {metrics['val_psnr']:.2f} dB, reconstruction FID "
            + (f"{recon_fid:.3f}" if recon_fid is not None else "n/a (fewer than 2 val images)")
            + f" (pixels, val vs its reconstructions; 0 = same distribution), usage {metrics['usage']} (EMA), "
            f"{metrics[f'{split}_usage']} ({split} set) -> {paths.tokenizer}"
        )
    resume.finish()
    return metrics


def import_tokenizer(cfg: Config, file: Path, image_size: int, names: list[str]):
    """The released tokenizer in ``file`` at the shards' image size, as an arpipe module, and what
    config.json records about it (``init``). Fails, naming the key, before any training."""
    state, found = load_released(file)
    try:
        state_dict, config, rebuilt = released_checkpoint(
            cfg.released.format,
            state,
            model=cfg.released.model or None,
            image_size=image_size,
            class_names=names,
        )
    except ReleasedFormatError as exc:
        raise ImportFailed(f"{STAGE}.released: {file}: {exc}") from None
    if "kind" not in config:
        raise ImportFailed(f"{STAGE}.released.format: {cfg.released.format} is an AR model format, not a tokenizer's")
    if config["kind"] != cfg.kind:
        raise ImportFailed(f"{STAGE}.kind is {cfg.kind}, but {file.name} holds a {config['kind']} tokenizer")
    model = merge_model(cfg.model, config["model"], FINETUNE_KEYS, f"{STAGE}.model", file)
    raw_model = build_tokenizer(config["kind"], model)
    raw_model.load_state_dict(state_dict)
    print(f"{STAGE}: starting from {file.name} ({cfg.released.format}), {cfg.steps} fine-tuning steps")
    return raw_model, {"from": "released", **source_entry(file, cfg.released.format, cfg.released.model or None,
                                                          found, rebuilt)}  # fmt: skip


def load_perceptual(path: str) -> PerceptualLoss | None:
    """The frozen VGG16 perceptual loss from a local state_dict file; None when ``path`` is ""."""
    if not path:
        return None
    file = Path(path)
    advice = (
        "give a local torchvision VGG16 state_dict (.pth or .safetensors, keys features.N.weight/bias; "
        'nothing is downloaded), or "" to train without the perceptual loss'
    )
    if not file.is_file():
        raise FileNotFoundError(f"{STAGE}.perceptual_weights: no file at {path!r}: {advice}")
    if file.suffix not in {".pth", ".pt", ".safetensors"}:
        raise ValueError(f"{STAGE}.perceptual_weights: {path!r} is not a .pth or .safetensors file: {advice}")
    if file.suffix == ".safetensors":
        state_dict = load_file(file)
    else:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    try:
        return PerceptualLoss.from_torchvision_state_dict(state_dict)
    except (KeyError, RuntimeError) as exc:
        raise ValueError(f"{STAGE}.perceptual_weights: {path!r} is not a VGG16 state_dict: {exc}") from exc


def lr_at(cfg: Config, step: int) -> float:
    """Cosine from ``lr`` to ``lr / 10``; a function of the step alone, so resuming needs no state."""
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))


def batch_at(cfg: Config, images_NCHW: torch.Tensor, step: int) -> torch.Tensor:
    """The step's images in [-1, 1]: epochs are seeded permutations, each image h-flipped with p = 0.5."""
    count = len(images_NCHW)
    per_epoch = max(count // cfg.batch_size, 1)
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(count, generator=step_generator(cfg.seed, epoch, purpose=2))
    index = order[within * cfg.batch_size : (within + 1) * cfg.batch_size]
    x_BCHW = images_NCHW[index].float() / 127.5 - 1
    flip_B = torch.rand(len(index), generator=step_generator(cfg.seed, step, purpose=3)) < 0.5
    return torch.where(flip_B[:, None, None, None], x_BCHW.flip(-1), x_BCHW)


def reconstruction_loss(kind: str, recon_BCHW: torch.Tensor, x_BCHW: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(recon_BCHW, x_BCHW) if kind == "l2" else F.l1_loss(recon_BCHW, x_BCHW)


@torch.no_grad()
def reconstruct(model, images_NHWC: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """decode(encode(images)) as uint8 NHWC, the path the token cache and samplers use."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images_NHWC), batch_size):
        x = torch.from_numpy(images_NHWC[i : i + batch_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        y = model.decode(model.encode(x.to(device)))
        out.append(((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def pixel_features(images_NHWC: np.ndarray) -> np.ndarray:
    """uint8 images -> pixels in [0, 1], area-averaged to at most ``PIXEL_FID_SIDE`` a side, flattened:
    a fixed feature space that needs no trained network (the evalnet comes later in the DAG)."""
    x_NCHW = torch.from_numpy(images_NHWC).permute(0, 3, 1, 2).double() / 255
    side = min(PIXEL_FID_SIDE, x_NCHW.shape[-2], x_NCHW.shape[-1])
    return F.adaptive_avg_pool2d(x_NCHW, side).flatten(1).numpy()


def evaluate(model, images_NHWC: np.ndarray) -> dict:
    """Val MSE and PSNR (dB) on images in [0, 1], the pixel-space FID between the images and their
    reconstructions (``val_recon_fid_pixels``) and codebook usage overall and per scale."""
    was_training = model.training
    model.eval()
    recon = reconstruct(model, images_NHWC)
    model.train(was_training)
    mse = float(np.mean((recon.astype(np.float64) / 255 - images_NHWC.astype(np.float64) / 255) ** 2))
    psnr = 10 * math.log10(1 / max(mse, 1e-12))
    metrics = {"val_mse": mse, "val_psnr": psnr, "usage": model.codebook_usage()}
    if len(images_NHWC) >= 2:  # FID needs two images a set: a tiny val split gets PSNR only
        metrics["val_recon_fid_pixels"] = fid_from_features(pixel_features(recon), pixel_features(images_NHWC))
    return metrics


@torch.no_grad()
def data_usage(model, images_NHWC: np.ndarray, batch_size: int = 256) -> dict:
    """Codebook usage counted over every train image and its h-flip, the images training draws
    from (the token cache holds the flips only with ``cache_tokens.hflip``), with the training EMA's
    rule (models/codebook.py): free of the EMA's window."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = []
    for i in range(0, len(images_NHWC), batch_size):
        x = torch.from_numpy(images_NHWC[i : i + batch_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        tokens += [model.encode(view.to(device)).cpu() for view in (x, x.flip(-1))]
    model.train(was_training)
    return model.data_usage(torch.cat(tokens))


def recon_grid(model, images_NHWC: np.ndarray) -> np.ndarray:
    """Originals (top row) above their reconstructions, upscaled to >= 32 px per image."""
    recon = reconstruct(model, images_NHWC)
    grid = np.concatenate([np.concatenate(list(images_NHWC), 1), np.concatenate(list(recon), 1)], 0)
    scale = max(1, 32 // images_NHWC.shape[1])
    return grid.repeat(scale, 0).repeat(scale, 1)


def stage_config(cfg: Config) -> dict[str, Any]:
    """config.json's ``stage_config``. From scratch it leaves out the keys of released imports, so
    a scratch tokenizer's files stay byte-identical to those from before they existed."""
    config = dataclasses.asdict(cfg)
    if cfg.init_from == "scratch":
        del config["init_from"], config["released"]
    return config


def _write_outputs(cfg: Config, paths: Paths, model, names: list[str], history: list[dict], init) -> None:
    config = {
        "kind": model.kind,
        "model": model.config_dict(),
        "token_layout": model.token_layout,
        "codebook_size": model.codebook_size,
        "seq_len": model.seq_len,
        "image_size": model.config.image_size,
        "class_names": names,
        "stage_config": stage_config(cfg),
        **({"init": init} if init else {}),
    }
    write_checkpoint(paths.tokenizer, model.state_dict(), config)
    plot = Path(paths.plots) / STAGE / "loss.csv"
    plot.parent.mkdir(parents=True, exist_ok=True)
    with plot.open("w", newline="") as f:
        extra = ["perceptual"] if cfg.perceptual_weights else []  # the column exists only with the loss
        writer = csv.DictWriter(f, fieldnames=["step", *LOSS_TERMS, *extra], lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in history)


def main() -> None:
    stage_main(STAGE, Config, run, is_main_process=process_state().is_main_process)


if __name__ == "__main__":
    main()
