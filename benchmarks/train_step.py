"""Training-step speed, MFU and KV-cache sampling speed of both AR families at a small config.

Models (the configuration of ``../shared/reference/performance.md``, so figures compare directly):

- ``gpt``: ``GPT(GPTConfig(vocab_size=512, seq_len=64, num_classes=10, depth=8, width=256,
  heads=8))``, about 6.7M params, an 8x8 token grid (LlamaGen's GPT at the reference's size);
- ``var``: ``VAR(VARConfig(vocab_size=512, scales=(1,2,3,4,6,8), embed_dim=16, num_classes=10,
  depth=6, width=256, heads=4), quantizer)``, 130 tokens, with the quantizer of a freshly
  initialised msvq tokenizer whose latent is 8x8 (32px images, f=4, z_channels 16).

Training: one step = forward on uniformly random tokens and labels, fp32 cross-entropy, backward,
gradient clipping at 1.0 and an AdamW step (``param_groups(0.05)``, lr 1e-3), as
``stages/pretrain.py`` does it; dropouts at the configs' defaults, train mode. fp32 on CPU; with
``--device cuda``, bf16 autocast where the GPU supports it. ``--steps`` steps are timed after 2
untimed warm-up steps; the median is reported. MFU = ``flops_per_token() * batch * seq_len`` /
median step time / the matmul peak measured with ``core.training.matmul_peak_flops`` just before
and just after that family's steps (the higher of the two, so a busy moment on a shared machine
does not inflate MFU), at the compute dtype (fp32 on CPU, bf16 with autocast). Goal: MFU >= 50%.

Sampling (guidance-free, temperature 1, same seed for both paths), with the weights the timed steps
left (so the head is no longer the zero/near-uniform init and the logits depend on the prefix):

- cached: ``model.generate`` (KV cache); one untimed run, then the median of ``--sample-repeats``;
- uncached: the whole prefix recomputed every step, one timed run. GPT: at step t a forward over
  ``t`` real tokens plus a dummy one, last position's logits. VAR: at scale k a full forward over
  the tokens so far with zeros for the later scales (the block-causal mask hides them), scale k's
  logits. The tokens must equal the cached path's, token for token (else the script stops).

Goal: cached >= 5x uncached at 64 tokens (the GPT row; VAR needs only 6 steps, its ratio is shown
for information). The machines are shared and drift by up to +-20%: compare ratios within one run.

Run from the repository root::

    .venv/bin/python benchmarks/train_step.py
    .venv/bin/python benchmarks/train_step.py --family gpt --steps 20 --threads 2
    .venv/bin/python benchmarks/train_step.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SCRIPT_START = time.perf_counter()
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/train_step.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._results import write_results  # noqa: E402

FAMILIES = ("gpt", "var")
GOAL_MFU = 0.50
GOAL_CACHE_SPEEDUP = 5.0
GOAL_FAMILY = "gpt"  # the 64-token sequence the sampling goal is stated for
WARMUP_STEPS = 2
VOCAB_SIZE = 512
NUM_CLASSES = 10
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05
GRAD_CLIP = 1.0
SEED = 1234


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Time a training step (tokens/s, MFU vs the measured matmul peak) and sampling with and "
            "without the KV cache (images/s) for the GPT and VAR families at a ~6M-param config."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--family", choices=(*FAMILIES, "both"), default="both", help="which AR family to time")
    parser.add_argument("--batch", type=int, default=64, help="training batch size (sequences per step)")
    parser.add_argument("--steps", type=int, default=10, help=f"timed training steps after {WARMUP_STEPS} warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run")
    parser.add_argument("--sample-batch", type=int, default=64, help="images per sampling call")
    parser.add_argument("--sample-repeats", type=int, default=3, help="timed cached sampling calls (median)")
    args = parser.parse_args(argv)
    if min(args.batch, args.steps, args.sample_batch, args.sample_repeats) < 1:
        parser.error("--batch, --steps, --sample-batch and --sample-repeats must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    return args


# -- models ------------------------------------------------------------------------------------


def build_model(family: str, device: torch.device) -> torch.nn.Module:
    """The benchmark configuration of ``family``, freshly initialised, on ``device``."""
    torch.manual_seed(SEED)
    if family == "gpt":
        from models.gpt import GPT, GPTConfig

        config = GPTConfig(vocab_size=VOCAB_SIZE, seq_len=64, num_classes=NUM_CLASSES, depth=8, width=256, heads=8)
        return GPT(config).to(device)
    from models.msvq import MSVQConfig, MSVQTokenizer
    from models.var import VAR, VARConfig

    scales = (1, 2, 3, 4, 6, 8)
    # 32px / f=4 (channel_multipliers (1, 2, 2)) = an 8x8 latent, the last scale
    tokenizer = MSVQTokenizer(MSVQConfig(image_size=32, z_channels=16, codebook_size=VOCAB_SIZE, scales=scales))
    config = VARConfig(
        vocab_size=VOCAB_SIZE, scales=scales, embed_dim=16, num_classes=NUM_CLASSES, depth=6, width=256, heads=4
    )
    return VAR(config, tokenizer.quantizer).to(device)


def sequence_length(model: torch.nn.Module) -> int:
    return model.config.seq_len


def scale_bounds(model: torch.nn.Module) -> list[int]:
    """VAR: the first position of each scale, and L at the end."""
    bounds = [0]
    for side in model.config.scales:
        bounds.append(bounds[-1] + side * side)
    return bounds


# -- timing ------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn's result, wall-clock seconds), the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def use_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def time_training(model, args, device: torch.device) -> list[float]:
    """Seconds per timed training step (forward, backward, clip, AdamW), warm-up excluded."""
    generator = torch.Generator().manual_seed(SEED)
    length = sequence_length(model)
    tokens_BL = torch.randint(VOCAB_SIZE, (args.batch, length), generator=generator).to(device)
    labels_B = torch.randint(NUM_CLASSES, (args.batch,), generator=generator).to(device)
    optimizer = torch.optim.AdamW(model.param_groups(WEIGHT_DECAY), lr=LEARNING_RATE)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16(device) else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            logits_BLV = model(tokens_BL, labels_B)
        loss = F.cross_entropy(logits_BLV.float().flatten(0, 1), tokens_BL.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    seconds = []
    for i in range(WARMUP_STEPS + args.steps):
        _, took = timed(step, device)
        if i >= WARMUP_STEPS:
            seconds.append(took)
    return seconds


# -- sampling ----------------------------------------------------------------------------------


@torch.no_grad()
def sample_without_cache(model, labels_B: torch.Tensor, family: str, seed: int) -> torch.Tensor:
    """Guidance-free, temperature-1 sampling that recomputes the whole prefix at every step,
    drawing from the generator in the same order as ``generate``."""
    from models.sampling import sample_tokens

    device = labels_B.device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens_BL = torch.zeros(labels_B.shape[0], sequence_length(model), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        if family == "gpt":
            # position t predicts token t and sees tokens < t; tokens_BL[:, t] is still 0, a dummy
            for t in range(tokens_BL.shape[1]):
                logits_BV = model(tokens_BL[:, : t + 1], labels_B)[:, t].float()
                tokens_BL[:, t] = sample_tokens(logits_BV, generator=generator)
        else:
            # later scales hold zeros, which the block-causal mask hides from scale k
            bounds = scale_bounds(model)
            for start, end in zip(bounds, bounds[1:], strict=False):
                logits_BlV = model(tokens_BL, labels_B)[:, start:end].float()
                tokens_BL[:, start:end] = sample_tokens(logits_BlV, generator=generator)
    finally:
        model.train(was_training)
    return tokens_BL


def time_sampling(model, family: str, args, device: torch.device) -> tuple[float, float]:
    """(median seconds of a cached ``generate`` call, seconds of one uncached call); stops the
    script if the two paths do not draw the same tokens."""
    labels_B = torch.arange(args.sample_batch, device=device) % NUM_CLASSES

    def cached():
        return model.generate(labels_B, cfg_scale=1.0, generator=torch.Generator(device=device).manual_seed(SEED))

    reference_BL = cached()  # untimed warm-up; its tokens are the reference for the check below
    cached_seconds = [timed(cached, device)[1] for _ in range(args.sample_repeats)]
    uncached_BL, uncached_seconds = timed(lambda: sample_without_cache(model, labels_B, family, SEED), device)
    if not torch.equal(reference_BL, uncached_BL):
        differ = (reference_BL != uncached_BL).float().mean().item()
        raise SystemExit(
            f"{family}: cached and uncached sampling drew different tokens ({differ:.1%} differ) for the "
            "same seed: the KV cache does not reproduce the full forward"
        )
    return statistics.median(cached_seconds), uncached_seconds


# -- report ------------------------------------------------------------------------------------


@dataclass
class Result:
    family: str
    params: int
    seq_len: int
    sample_steps: int
    step_seconds: list[float]
    step_flops: float
    peak_flops: float
    cached_seconds: float
    uncached_seconds: float

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def mfu(self) -> float:
        return self.step_flops / self.median_step / self.peak_flops

    @property
    def cache_speedup(self) -> float:
        return self.uncached_seconds / self.cached_seconds


def run_family(family: str, args, device: torch.device) -> Result:
    from core.training import matmul_peak_flops

    model = build_model(family, device)
    peak_dtype = torch.bfloat16 if use_bf16(device) else torch.float32
    peak_before = matmul_peak_flops(device, peak_dtype)
    print(f"{family}: {model.num_params() / 1e6:.2f}M params, timing {args.steps} training steps ...", flush=True)
    step_seconds = time_training(model, args, device)
    # the higher of two measurements: a busy moment on a shared machine must not inflate MFU
    peak = max(peak_before, matmul_peak_flops(device, peak_dtype))
    print(f"{family}: sampling {args.sample_batch} images with and without the KV cache ...", flush=True)
    cached, uncached = time_sampling(model, family, args, device)
    length = sequence_length(model)
    return Result(
        family=family,
        params=model.num_params(),
        seq_len=length,
        sample_steps=model.steps,
        step_seconds=step_seconds,
        step_flops=model.flops_per_token() * args.batch * length,
        peak_flops=peak,
        cached_seconds=cached,
        uncached_seconds=uncached,
    )


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells) -> str:  # family left-aligned, figures right-aligned
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(line(header))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    print()


def report(results: list[Result], args) -> None:
    print()
    print_table(
        ("family", "params", "tokens", "step s (median)", "step s (best)", "tokens/s", "model TFLOP/s",
         "peak TFLOP/s", "MFU"),
        [
            (r.family, f"{r.params / 1e6:.2f}M", str(r.seq_len), f"{r.median_step:.3f}", f"{min(r.step_seconds):.3f}",
             f"{args.batch * r.seq_len / r.median_step:,.0f}", f"{r.step_flops / r.median_step / 1e12:.4f}",
             f"{r.peak_flops / 1e12:.4f}", f"{r.mfu:.1%}")
            for r in results
        ],
    )  # fmt: skip
    print_table(
        ("family", "steps", "cached s", "cached images/s", "uncached s", "uncached images/s", "speed-up"),
        [
            (r.family, str(r.sample_steps),
             f"{r.cached_seconds:.2f}", f"{args.sample_batch / r.cached_seconds:,.1f}", f"{r.uncached_seconds:.2f}",
             f"{args.sample_batch / r.uncached_seconds:,.1f}", f"{r.cache_speedup:.1f}x")
            for r in results
        ],
    )  # fmt: skip
    for r in results:
        verdict = "MET" if r.mfu >= GOAL_MFU else "NOT MET"
        print(f"{r.family}: goal MFU >= {GOAL_MFU:.0%}: {verdict} ({r.mfu:.1%})")
    for r in results:
        if r.family == GOAL_FAMILY:
            verdict = "MET" if r.cache_speedup >= GOAL_CACHE_SPEEDUP else "NOT MET"
            print(
                f"{r.family}: goal KV cache >= {GOAL_CACHE_SPEEDUP:.0f}x faster than recompute at {r.seq_len} tokens: "
                f"{verdict} ({r.cache_speedup:.1f}x)"
            )
        else:
            print(
                f"{r.family}: KV cache {r.cache_speedup:.1f}x faster than recompute "
                f"(for information: {r.sample_steps} steps)"
            )


def figures(results: list[Result], args, precision: str) -> dict:
    """What ``report`` printed, for benchmarks/results/train_step.json."""
    return {
        "config": {"batch": args.batch, "steps": args.steps, "warmup_steps": WARMUP_STEPS, "device": args.device,
                   "precision": precision, "sample_batch": args.sample_batch, "sample_cfg_scale": 1.0},
        "families": {
            r.family: {
                "params": r.params, "seq_len": r.seq_len, "sample_steps": r.sample_steps,
                "step_seconds_median": r.median_step, "step_seconds_best": min(r.step_seconds),
                "step_seconds": r.step_seconds, "tokens_per_s": args.batch * r.seq_len / r.median_step,
                "step_flops": r.step_flops, "peak_flops": r.peak_flops, "mfu": r.mfu,
                "cached_sample_seconds": r.cached_seconds, "cached_images_per_s": args.sample_batch / r.cached_seconds,
                "uncached_sample_seconds": r.uncached_seconds,
                "uncached_images_per_s": args.sample_batch / r.uncached_seconds, "cache_speedup": r.cache_speedup,
            }
            for r in results
        },
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = "bf16 autocast" if use_bf16(device) else "fp32"
    print(
        f"train step + sampling, batch {args.batch}, {args.steps} timed steps after {WARMUP_STEPS} warm-up, "
        f"sample batch {args.sample_batch}; {args.device} ({precision}), {torch.get_num_threads()} thread(s), "
        f"torch {torch.__version__}; figures drift +-20% on shared machines: compare ratios within a run",
        flush=True,
    )
    families = FAMILIES if args.family == "both" else (args.family,)
    results = [run_family(family, args, device) for family in families]
    report(results, args)
    write_results(
        "train_step",
        figures(results, args, precision),
        peaks={f"{r.family}_step": r.peak_flops for r in results},
        argv=None if argv is None else ["benchmarks/train_step.py", *argv],
    )
    print(f"whole benchmark (model building and peak measurement included): {elapsed():.1f} s")
    return 0  # a benchmark, not a test: a missed goal is reported, not an error


def elapsed() -> float:
    return time.perf_counter() - SCRIPT_START


if __name__ == "__main__":
    sys.exit(main())
