"""What each pipeline stage computes, from the params alone: the numerator of ``arpipe plan``'s times.

Per stage: the FLOPs it runs and the sequential launches a GPU cannot hide (optimizer steps,
sampling forward passes, flow-map ODE steps), for ``images`` in the source. Model FLOPs come from
the networks built on the meta device (``arpipe.plan.meta_models``). With F the AR model's
training FLOPs per sequence (its ``flops_per_token()`` × L: PaLM's 6·N plus the attention matmuls)
and f = F/3 a forward (backward ≈ 2 × forward), what each stage's code does per row:

- ``train_tokenizer``, ``train_evalnet``: steps × batch × 3 × the counted forward; val passes.
- ``cache_tokens``: one encode per image (twice per train image with ``hflip``).
- ``pretrain``: steps × batch × F; val passes (f) at ``eval_every`` and at the end.
- ``sar`` (var only; a gpt passes through): 2F per row (a teacher-forced and a student-forced
  pass, both trained), + f with rollout guidance.
- ``cca``, ``ddo``: the policy trains on 2 × batch rows (with labels and negatives; reals and
  fakes) and the frozen reference runs forward on the same 2 × batch: 2 × (F + f) = 8/3 F per
  batch row. ``ddo`` also draws its fakes (rounds × steps_per_round × batch) by KV-cached
  sampling, decoded and re-encoded with ``round_trip``.
- sampling: f per sequence (2f with guidance: conditional and null rows run together; attention
  counted over the full L, an overestimate under the KV cache) + one tokenizer decode per image;
  batches × the model's steps (L for gpt, scales for var) sequential passes.
- ``distill_pairs``: the teacher's sampling with each draw replaced by the flow-matching map:
  ``ode_steps`` × 4·V·D FLOPs per position (two V×D matmuls), each ODE step sequential.
- ``distill``: steps × batch × F (the student is the teacher's trunk; its heads are small).
- ``distill2``: GTS steps: the teacher's log-probs (f, 2f guided) + the AR-diffusion model's
  F + its score head's training; CSD steps: (1 + fake_updates) trained passes of generator and
  fake network, the teacher's log-probs and the frozen fake trunk's forward, 4·V·D per position
  for each teacher denoiser.
- ``evaluate``: every checkpoint that is not a pass-through, at every guidance scale (the students
  in 1 and 2 steps), samples_per_class × classes samples + their evalnet features; the train
  images' tokenizer round trip and evalnet features of train, round trip and val.
- ``shard`` decodes and resizes: no FLOPs model, it is timed per image.

Not counted: the tokenizer's discriminator and perceptual network, Inception features, FID's
matrix square roots, k-NN radii, data loading and file writes (the CPU calibration absorbs them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

SAMPLE_BATCH = 256  # models.ar.sample_images' batch: the stages' sample grids
VAL_BATCH = 256  # the stages' val passes
LATENCY_IMAGES = 20  # stages.evaluate: images generated one at a time, teacher and students
DIGITS_IMAGES = 1797  # the digits source: scikit-learn's load_digits
# the stages whose params set their work (shard's is the image count)
CONFIGURED = (
    "train_tokenizer",
    "cache_tokens",
    "pretrain",
    "sar",
    "cca",
    "ddo",
    "distill_pairs",
    "distill",
    "distill2",
    "train_evalnet",
    "evaluate",
)


@dataclass(frozen=True)
class Work:
    """FLOPs and the sequential launches they come in (what bounds a small model on a GPU)."""

    flops: float = 0.0
    optimizer_steps: int = 0
    forward_passes: int = 0  # sampling steps and val batches, no gradient
    ode_steps: int = 0  # distill_pairs' flow-map Euler steps (a few small kernels each)

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.optimizer_steps + other.optimizer_steps,
                    self.forward_passes + other.forward_passes, self.ode_steps + other.ode_steps)  # fmt: skip


@dataclass(frozen=True)
class StageWork:
    stage: str
    what: str  # the work in words, e.g. "600 steps x 64 + 160 samples"
    work: Work = field(default_factory=Work)
    images: int = 0  # shard: images decoded and resized (timed per image, no FLOPs)


@dataclass(frozen=True)
class ModelCosts:
    """Per-item FLOPs of the pipeline's networks, counted on the meta device."""

    tokenizer_train_per_image: float  # 3 x (encoder + decoder) forward
    encode_per_image: float  # images -> tokens
    decode_per_image: float  # tokens -> images
    ar_train_per_sequence: float  # F: flops_per_token() x L
    ar_steps: int  # sequential passes per sample: L (gpt) or scales (var)
    seq_len: int
    codebook_size: int
    code_dim: int
    evalnet_forward_per_image: float
    score_head_forward_per_position: float  # distill2's ScoreHead (all linear: 2 x its params)

    @property
    def ar_forward_per_sequence(self) -> float:
        return self.ar_train_per_sequence / 3


@dataclass(frozen=True)
class Images:
    """The source's images, split as ``shard`` splits them (by content hash: ~val_fraction)."""

    train: int
    val: int

    @property
    def total(self) -> int:
        return self.train + self.val

    @classmethod
    def split(cls, total: int, val_fraction: float) -> Images:
        val = round(total * val_fraction)
        return cls(total - val, val)


def source_images(params: dict[str, Any], given: int | None) -> tuple[int | None, str]:
    """(image count, where it came from), or (None, why not): ``given``, the digits source's
    1,797, or the rows of the built shards' manifest when they come from ``shard.source_path``
    (every manifest row's ``source`` starts with that path; shards of another source do not count)."""
    import os
    from pathlib import Path

    import pyarrow.parquet as pq

    from core.config import load_paths

    if given is not None:
        return given, "--images"
    shard = params.get("shard") or {}
    if shard.get("source", "digits") == "digits":
        return DIGITS_IMAGES, "the digits source"
    manifest = Path(load_paths(params).shards) / "manifest.parquet"
    if not manifest.is_file():
        return None, f"{manifest} does not exist yet"
    sources = pq.read_table(manifest, columns=["source"]).column("source").slice(0, 1).to_pylist()
    root = os.path.abspath(shard.get("source_path", ""))
    if not sources or not os.path.abspath(sources[0]).startswith(root):
        return None, f"{manifest} holds shards of another source than {shard.get('source_path')}"
    return pq.read_metadata(manifest).num_rows, str(manifest)


def model_costs(params: dict[str, Any], num_classes: int) -> ModelCosts:
    from torch.utils.flop_counter import FlopCounterMode

    from arpipe.plan import meta_models
    from models.dd2 import ScoreHead

    tokenizer, model, evalnet = meta_models(params, num_classes)
    size = params["shard"]["image_size"]
    codebook_size, code_dim = tokenizer.quantizer.codebook.weight.shape
    distill2 = params.get("distill2") or {}

    def forward(run) -> tuple[float, Any]:
        with FlopCounterMode(display=False) as counter, torch.no_grad(), torch.device("meta"):
            out = run()
        return float(counter.get_total_flops()), out

    encoder, latent = forward(lambda: tokenizer.encode_latent(torch.zeros(1, 3, size, size)))
    decoder, _ = forward(lambda: tokenizer.decode_latent(latent))
    evalnet_forward, _ = forward(lambda: evalnet(torch.zeros(1, 3, size, size)))
    with torch.device("meta"):
        head = ScoreHead(model.config.model_width, code_dim, distill2.get("head_width", 256),
                         distill2.get("head_depth", 3))  # fmt: skip
    return ModelCosts(
        tokenizer_train_per_image=3 * (encoder + decoder),
        # + the nearest-codeword search of every token (the quantizer's bincount has no meta kernel)
        encode_per_image=encoder + tokenizer.seq_len * 2 * codebook_size * code_dim,
        decode_per_image=decoder,
        ar_train_per_sequence=model.flops_per_token() * tokenizer.seq_len,
        ar_steps=model.steps,
        seq_len=tokenizer.seq_len,
        codebook_size=int(codebook_size),
        code_dim=int(code_dim),
        evalnet_forward_per_image=evalnet_forward,
        score_head_forward_per_position=2.0 * sum(p.numel() for p in head.parameters()),
    )


def _sampling(costs: ModelCosts, samples: int, *, guided: bool, batch: int = SAMPLE_BATCH) -> Work:
    """KV-cached sampling of ``samples`` images, decoded by the tokenizer."""
    per_sample = costs.ar_forward_per_sequence * (2 if guided else 1) + costs.decode_per_image
    return Work(flops=samples * per_sample, forward_passes=math.ceil(samples / batch) * costs.ar_steps)


def _grid(costs: ModelCosts, num_classes: int, per_class: int, scales: list[float]) -> Work:
    """A stage's samples.png: ``per_class`` samples of every class at each guidance scale."""
    work = Work()
    for scale in scales:
        work += _sampling(costs, num_classes * per_class, guided=scale != 1.0)
    return work


def _val(per_row: float, rows: int, evaluations: int) -> Work:
    return Work(flops=evaluations * rows * per_row, forward_passes=evaluations * math.ceil(rows / VAL_BATCH))


def stage_works(params: dict[str, Any], costs: ModelCosts, images: Images, num_classes: int) -> list[StageWork]:
    """One entry per stage that computes something under ``params`` (pass-throughs are left out)."""
    from importlib import import_module

    from core.config import load_section

    cfg = {name: load_section(params, name, import_module(f"stages.{name}").Config) for name in CONFIGURED}
    rows = images.train * (2 if cfg["cache_tokens"].hflip else 1)  # the train cache
    arch = cfg["pretrain"].arch
    works = [StageWork("shard", f"{images.total:,} images decoded, resized", images=images.total)]
    works.append(_tokenizer(cfg["train_tokenizer"], costs, images))
    encoded = rows + images.val
    batches = math.ceil(encoded / cfg["cache_tokens"].batch_size)
    works.append(StageWork("cache_tokens", f"{encoded:,} images encoded",
                           Work(flops=encoded * costs.encode_per_image, forward_passes=batches)))  # fmt: skip
    works.append(_pretrain(cfg["pretrain"], costs, images, num_classes))
    if arch == "var":
        works.append(_sar(cfg["sar"], costs, rows, num_classes))
    if not cfg["cca"].skip:
        works.append(_cca(cfg["cca"], costs, rows, num_classes))
    if cfg["ddo"].rounds:
        works.append(_ddo(cfg["ddo"], costs, rows, num_classes))
    works.append(_distill_pairs(cfg["distill_pairs"], costs))
    works.append(_distill(cfg["distill"], costs, num_classes))
    works.append(_distill2(cfg["distill2"], cfg["distill_pairs"], costs, num_classes))
    works.append(_evalnet(cfg["train_evalnet"], costs, images))
    works.append(_evaluate(cfg, costs, images, num_classes, arch))
    return [w for w in works if w.images or w.work.flops]


def _tokenizer(cfg, costs: ModelCosts, images: Images) -> StageWork:
    evaluations = math.ceil(cfg.steps / cfg.eval_every) if cfg.steps else 0
    round_trip = costs.tokenizer_train_per_image / 3
    work = Work(flops=cfg.steps * cfg.batch_size * costs.tokenizer_train_per_image, optimizer_steps=cfg.steps)
    return StageWork("train_tokenizer", f"{cfg.steps:,} steps x {cfg.batch_size} images",
                     work + _val(round_trip, images.val, evaluations))  # fmt: skip


def _pretrain(cfg, costs: ModelCosts, images: Images, num_classes: int) -> StageWork:
    evaluations = math.ceil(cfg.steps / cfg.eval_every) + 1  # at eval_every, the last step, and the outs
    grids = 1 + ((cfg.steps - 1) // cfg.sample_every if cfg.sample_every and cfg.steps else 0)
    work = Work(flops=cfg.steps * cfg.batch_size * costs.ar_train_per_sequence,
                optimizer_steps=cfg.steps * cfg.grad_accum)  # fmt: skip
    work += _val(costs.ar_forward_per_sequence, images.val, evaluations)
    for _ in range(grids):
        work += _grid(costs, num_classes, cfg.samples_per_class, cfg.sample_cfg_scales)
    samples = grids * num_classes * cfg.samples_per_class * len(cfg.sample_cfg_scales)
    trained = f"{cfg.steps:,} steps x {cfg.batch_size}" if cfg.steps else "imported"  # steps 0: a released model
    return StageWork("pretrain", f"{trained} + {samples:,} samples", work)


def _epoch(steps: int, rows: int, batch_size: int) -> tuple[int, str]:
    """(steps, how they were chosen): ``steps``, or one epoch of the cache when 0."""
    return (steps, "") if steps else (math.ceil(rows / batch_size), f" (1 epoch of {rows:,})")


def _sar(cfg, costs: ModelCosts, rows: int, num_classes: int) -> StageWork:
    steps, how = _epoch(cfg.steps, rows, cfg.batch_size)
    per_row = 2 * costs.ar_train_per_sequence + (costs.ar_forward_per_sequence if cfg.rollout_guidance > 0 else 0)
    work = Work(flops=steps * cfg.batch_size * per_row, optimizer_steps=steps)
    return StageWork("sar", f"{steps:,} steps{how} x {cfg.batch_size}, 2 passes",
                     work + _grid(costs, num_classes, cfg.samples_per_class, cfg.sample_cfg_scales))  # fmt: skip


def _contrastive(costs: ModelCosts, steps: int, batch_size: int) -> Work:
    """cca / ddo: the policy trains on 2 x batch rows, the frozen reference reads the same rows."""
    per_row = 2 * (costs.ar_train_per_sequence + costs.ar_forward_per_sequence)
    return Work(flops=steps * batch_size * per_row, optimizer_steps=steps)


def _cca(cfg, costs: ModelCosts, rows: int, num_classes: int) -> StageWork:
    steps, how = _epoch(cfg.steps, rows, cfg.batch_size)
    return StageWork("cca", f"{steps:,} steps{how} x 2·{cfg.batch_size}",
                     _contrastive(costs, steps, cfg.batch_size)
                     + _grid(costs, num_classes, cfg.samples_per_class, cfg.sample_cfg_scales))  # fmt: skip


def _ddo(cfg, costs: ModelCosts, rows: int, num_classes: int) -> StageWork:
    per_round, how = _epoch(cfg.steps_per_round, rows, cfg.batch_size)
    fakes = per_round * cfg.batch_size
    work = _contrastive(costs, cfg.rounds * per_round, cfg.batch_size)
    for _ in range(cfg.rounds):
        work += _sampling(costs, fakes, guided=cfg.fake_cfg_scale != 1.0, batch=cfg.sample_batch_size)
        if cfg.round_trip:  # decoded above, re-encoded here
            work += Work(flops=fakes * costs.encode_per_image)
    work += _grid(costs, num_classes, cfg.samples_per_class, cfg.sample_cfg_scales)
    return StageWork("ddo", f"{cfg.rounds} rounds x {per_round:,} steps{how} x 2·{cfg.batch_size} "
                     f"+ {cfg.rounds * fakes:,} fakes", work)  # fmt: skip


def _flow_map(costs: ModelCosts, ode_steps: int) -> float:
    """FLOPs of one position through models.dd.flow_map: two V x D matmuls per ODE step."""
    return 4 * costs.codebook_size * costs.code_dim * (ode_steps + 1)


def _distill_pairs(cfg, costs: ModelCosts) -> StageWork:
    batches = math.ceil(cfg.count / cfg.batch_size)
    per_pair = costs.ar_forward_per_sequence * (2 if cfg.cfg_scale != 1.0 else 1) + costs.seq_len * _flow_map(
        costs, cfg.ode_steps
    )
    work = Work(flops=cfg.count * per_pair, forward_passes=batches * costs.ar_steps,
                ode_steps=batches * costs.ar_steps * cfg.ode_steps)  # fmt: skip
    return StageWork("distill_pairs", f"{cfg.count:,} pairs, {cfg.ode_steps} ODE steps per AR step", work)


def _distill(cfg, costs: ModelCosts, num_classes: int) -> StageWork:
    work = Work(flops=cfg.steps * cfg.batch_size * costs.ar_train_per_sequence, optimizer_steps=cfg.steps)
    # held-out agreement and samples.png: 1-step and 2-step predictions (3 forwards per row)
    work += _val(3 * costs.ar_forward_per_sequence, cfg.val_count, 1)
    grid = num_classes * cfg.samples_per_class
    work += Work(flops=grid * (3 * costs.ar_forward_per_sequence + 2 * costs.decode_per_image), forward_passes=3)
    return StageWork("distill", f"{cfg.steps:,} steps x {cfg.batch_size} pairs", work)


def _distill2(cfg, pairs_cfg, costs: ModelCosts, num_classes: int) -> StageWork:
    L, f, F = costs.seq_len, costs.ar_forward_per_sequence, costs.ar_train_per_sequence
    teacher = f * (2 if pairs_cfg.cfg_scale != 1.0 else 1)  # the teacher's log-probs, guided as the pairs
    denoise = L * 4 * costs.codebook_size * costs.code_dim  # the teacher's exact denoiser
    head = L * costs.score_head_forward_per_position
    trained = F + 3 * head  # the AR-diffusion model (trunk + score head), forward and backward
    gts = teacher + denoise + trained
    csd = (1 + cfg.fake_updates) * trained + teacher + f + 3 * (head + denoise)
    work = Work(flops=cfg.batch_size * (cfg.gts_steps * gts + cfg.steps * csd),
                optimizer_steps=cfg.gts_steps + cfg.steps * (1 + cfg.fake_updates))  # fmt: skip
    work += _val(f + head + teacher, cfg.eval_count, 1)
    grid = num_classes * cfg.samples_per_class
    work += Work(flops=grid * (f + head + costs.decode_per_image), forward_passes=1)
    return StageWork("distill2", f"{cfg.gts_steps:,} GTS + {cfg.steps:,} CSD steps x {cfg.batch_size}", work)


def _evalnet(cfg, costs: ModelCosts, images: Images) -> StageWork:
    evaluations = (cfg.steps - 1) // cfg.eval_every + 1
    work = Work(flops=cfg.steps * cfg.batch_size * 3 * costs.evalnet_forward_per_image, optimizer_steps=cfg.steps)
    return StageWork("train_evalnet", f"{cfg.steps:,} steps x {cfg.batch_size} images",
                     work + _val(costs.evalnet_forward_per_image, images.val, evaluations))  # fmt: skip


def _evaluate(cfg: dict, costs: ModelCosts, images: Images, num_classes: int, arch: str) -> StageWork:
    ev = cfg["evaluate"]
    n = num_classes * ev.samples_per_class
    checkpoints = ["base", *(["sar"] if arch == "var" else []), *([] if cfg["cca"].skip else ["cca"]),
                   *(["ddo"] if cfg["ddo"].rounds else [])]  # fmt: skip
    work, sets = Work(), 0
    for _ in checkpoints:
        for scale in ev.cfg_scales:
            work += _sampling(costs, n, guided=scale != 1.0, batch=ev.batch_size)
            sets += 1
    if cfg["distill_pairs"].cfg_scale not in ev.cfg_scales:  # the teacher again, for the speed-up
        work += _sampling(costs, n, guided=cfg["distill_pairs"].cfg_scale != 1.0, batch=ev.batch_size)
    # students: distilled in 1 and 2 steps (3 forwards), distilled2 in 1; decoded each time
    work += Work(flops=n * (4 * costs.ar_forward_per_sequence + 3 * costs.decode_per_image), forward_passes=4)
    sets += 3
    work += Work(forward_passes=LATENCY_IMAGES * (costs.ar_steps + 4))  # batch-1 latency: teacher, students
    features = sets * n + 2 * images.train + images.val  # samples, train and its round trip, val
    work += Work(flops=images.train * (costs.encode_per_image + costs.decode_per_image)
                 + features * costs.evalnet_forward_per_image)  # fmt: skip
    return StageWork("evaluate", f"{sets} sample sets x {n:,} + {images.total:,} real images", work)
