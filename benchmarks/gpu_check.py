"""GPU check: GPT-B- and VAR-d16-size training steps (eager, compiled, FSDP smoke) and sampling.

What it runs, per family, on one CUDA GPU in bf16 autocast (under 8 minutes on an H100):

- ``gpt``: ``GPTConfig(vocab_size=16384, seq_len=256, num_classes=1000, depth=12)`` (width 768,
  12 heads: LlamaGen GPT-B, ~111M params, 16x16 tokens);
- ``var``: ``VARConfig(vocab_size=4096, scales=(1,2,3,4,5,6,8,10,13,16), embed_dim=32,
  num_classes=1000, depth=16)`` (width 1024, 16 heads: VAR-d16, 680 tokens), with the quantizer of
  a freshly initialised msvq tokenizer whose latent is 16x16 (its conv backbone is made narrow:
  only the quantizer is used, sampling is timed on tokens, decoding excluded).

Rows of the table:

- ``train eager`` / ``train compiled`` (batch: gpt 64, var 32; ``--batch`` sets both): forward,
  fp32 cross-entropy, backward, clip at 1.0, AdamW (``param_groups(0.05)``), on random tokens;
  ``--steps`` timed after warm-up, median. The compiled row is ``torch.compile`` of the model
  (as ``core.training.compile_model`` does it), its first steps (compilation) reported apart.
  MFU = ``flops_per_token() * batch * seq_len`` / median step / the GPU's dense bf16 matmul peak
  measured in this process (``matmul_peak_flops``).
- ``fsdp smoke``: a child process under ``accelerate launch --config_file accelerate/fsdp.yaml
  --num_processes 1`` (the stages' FSDP2 profile on one GPU) builds the model through
  ``core.training.build_accelerator`` + ``accelerator.prepare`` + ``torch.compile`` (the order of
  ``compile_model``) and runs a few steps: it passes when the losses are finite and the gathered
  full state dict has the bare module's keys and shapes. Its step time is shown, not compared
  (one process shards nothing).
- ``sample b64`` / ``sample b256``: ``model.generate`` with guidance (GPT: scale 2.0 constant; VAR:
  VAR's linear ramp for its cfg 1.5, i.e. ``linear_guidance_ramp(2.5, steps)``), temperature 1, no
  top-k/top-p, one untimed call then the median of ``--sample-repeats``: images/s (tokens only);
  ``sample b64 compiled`` / ``b256 compiled``: the same through ``generate(compiled=...)`` (static
  KV cache for the GPT, a graph per scale for VAR), the compiling first call reported apart.
- peak memory: ``torch.cuda.max_memory_allocated`` per row (GiB); on CPU the process's max RSS.

``--tiny`` (automatic when no CUDA device is visible) runs the same code paths at a tiny config on
the CPU in fp32 in seconds: compile with the ``aot_eager`` backend (dynamo + AOTAutograd, no
inductor code generation, which takes minutes on 2 cores), sampling batches 4 and 8; accelerate
cannot apply FSDP on CPU, so the smoke runs the same child unsharded and says so. The tiny figures
say nothing about speed; they prove the script runs (tests/test_gpu_check.py).

Prints one table and writes it with its provenance to ``benchmarks/results/gpu_check.json`` (or
``gpu_check_tiny.json``) through ``benchmarks/_results.py``. Run from the repository root::

    make bench-gpu TORCH_VARIANT=cu128        # on a GPU machine (installs the CUDA build of torch)
    .venv/bin/python benchmarks/gpu_check.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT_START = time.perf_counter()
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/gpu_check.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._results import write_results  # noqa: E402

FAMILIES = ("gpt", "var")
GUIDANCE = {"gpt": 2.0, "var": 1.5}  # GPT constant; VAR through its linear ramp
SEED = 1234
FSDP_CONFIG = REPO_ROOT / "accelerate" / "fsdp.yaml"


@dataclass(frozen=True)
class Setup:
    """Sizes of one run: ``full`` (GPU) or ``tiny`` (CPU, seconds)."""

    name: str
    gpt: dict
    var: dict
    msvq: dict
    batch: dict  # training batch per family
    steps: int
    warmup: int
    sample_batches: tuple[int, ...]
    compile_backend: str
    peak_size: int
    fsdp_steps: int = 3
    fsdp_compile_backend: str = "inductor"
    compiled_sample_batches: tuple[int, ...] = (64, 256)


FULL = Setup(
    name="full",
    gpt={"vocab_size": 16384, "seq_len": 256, "num_classes": 1000, "depth": 12},
    var={"vocab_size": 4096, "scales": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), "embed_dim": 32, "num_classes": 1000,
         "depth": 16},
    msvq={"image_size": 256, "base_channels": 8, "channel_multipliers": (1, 1, 2, 2, 4), "attention": False,
          "z_channels": 32, "codebook_size": 4096, "scales": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)},
    batch={"gpt": 64, "var": 32}, steps=10, warmup=3, sample_batches=(64, 256), compile_backend="inductor",
    peak_size=8192,
)  # fmt: skip
TINY = Setup(
    name="tiny",
    gpt={"vocab_size": 64, "seq_len": 16, "num_classes": 10, "depth": 2, "width": 32, "heads": 2},
    var={"vocab_size": 64, "scales": (1, 2, 4), "embed_dim": 8, "num_classes": 10, "depth": 2, "width": 32,
         "heads": 2},
    msvq={"image_size": 16, "base_channels": 8, "channel_multipliers": (1, 2, 2), "attention": False,
          "z_channels": 8, "codebook_size": 64, "scales": (1, 2, 4)},
    batch={"gpt": 8, "var": 8}, steps=2, warmup=1, sample_batches=(4, 8), compile_backend="aot_eager", peak_size=256,
    fsdp_steps=2, fsdp_compile_backend="eager", compiled_sample_batches=(4,),
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU, fp32 (automatic without CUDA)")
    parser.add_argument("--family", choices=(*FAMILIES, "both"), default="both")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default: 10; tiny 2)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: gpt 64, var 32; tiny 8)")
    parser.add_argument("--sample-repeats", type=int, default=2, help="timed sampling calls per batch (median)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the compiled rows")
    parser.add_argument("--skip-fsdp", action="store_true", help="leave out the FSDP smoke")
    parser.add_argument("--fsdp-child", choices=FAMILIES, help=argparse.SUPPRESS)  # the smoke's own process
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        print("no CUDA device visible to torch: running --tiny on the CPU (fp32)", flush=True)
        args.tiny = True
    return args


def setup_for(args) -> Setup:
    setup = TINY if args.tiny else FULL
    overrides = {k: v for k, v in (("steps", args.steps), ("batch", args.batch)) if v is not None}
    if "batch" in overrides:
        overrides["batch"] = dict.fromkeys(FAMILIES, overrides["batch"])
    return Setup(**{**setup.__dict__, **overrides})


def device_for(args) -> torch.device:
    return torch.device("cpu" if args.tiny else "cuda")


def autocast(device: torch.device):
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- models ------------------------------------------------------------------------------------


def build_model(family: str, setup: Setup, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(SEED)
    if family == "gpt":
        from models.gpt import GPT, GPTConfig

        return GPT(GPTConfig(**setup.gpt)).to(device)
    from models.msvq import MSVQConfig, MSVQTokenizer
    from models.var import VAR, VARConfig

    tokenizer = MSVQTokenizer(MSVQConfig(**setup.msvq))
    return VAR(VARConfig(**setup.var), tokenizer.quantizer).to(device)


def random_batch(model, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    config = model.config
    tokens_BL = torch.randint(config.vocab_size, (batch, config.seq_len), generator=generator)
    labels_B = torch.randint(config.num_classes, (batch,), generator=generator)
    return tokens_BL.to(device), labels_B.to(device)


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: process max RSS


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -- rows --------------------------------------------------------------------------------------


@dataclass
class Row:
    family: str
    what: str
    batch: int
    seconds: float | None = None  # median step or sampling call
    tokens_per_s: float | None = None
    mfu: float | None = None
    images_per_s: float | None = None
    memory_gib: float | None = None
    note: str = ""
    ok: bool = True
    extra: dict = field(default_factory=dict)


def train_steps(model, optimizer, tokens_BL, labels_B, device, count: int) -> list[float]:
    """Seconds of each of ``count`` training steps (forward, backward, clip, AdamW)."""
    seconds = []
    for _ in range(count):
        sync(device)
        start = time.perf_counter()
        with autocast(device):
            logits_BLV = model(tokens_BL, labels_B, label_dropout=False)
        loss = F.cross_entropy(logits_BLV.float().flatten(0, 1), tokens_BL.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)}")
    return seconds


def train_row(family: str, setup: Setup, device: torch.device, peak: float, compiled: bool) -> Row:
    reset_memory(device)
    raw_model = build_model(family, setup, device).train()
    model = torch.compile(raw_model, backend=setup.compile_backend) if compiled else raw_model
    optimizer = torch.optim.AdamW(raw_model.param_groups(0.05), lr=1e-4)
    tokens_BL, labels_B = random_batch(raw_model, setup.batch[family], device)
    try:
        warm = train_steps(model, optimizer, tokens_BL, labels_B, device, setup.warmup)
        seconds = statistics.median(train_steps(model, optimizer, tokens_BL, labels_B, device, setup.steps))
    finally:
        if compiled:
            torch._dynamo.reset()  # drop the compiled graphs (and the model they hold) before the next row
    length = raw_model.config.seq_len
    flops = raw_model.flops_per_token() * setup.batch[family] * length
    note = f"{raw_model.num_params() / 1e6:.1f}M params, {length} tokens"
    if compiled:
        note += f", {setup.compile_backend}: first {setup.warmup} steps {sum(warm):.1f} s"
    return Row(family, "train compiled" if compiled else "train eager", setup.batch[family], seconds,
               setup.batch[family] * length / seconds, flops / seconds / peak, memory_gib=memory_gib(device), note=note,
               extra={"warmup_seconds": warm, "step_flops": flops, "params": raw_model.num_params()})  # fmt: skip


@torch.no_grad()
def sample_rows(family: str, setup: Setup, device: torch.device, repeats: int, compiled: bool = False) -> list[Row]:
    """Eager rows at ``sample_batches``; ``compiled``: ``generate(compiled=<the setup's backend>)``
    rows at ``compiled_sample_batches``, the first (compiling) call reported apart."""
    from models.sampling import linear_guidance_ramp

    model = build_model(family, setup, device).eval()
    cfg_scale = GUIDANCE[family] if family == "gpt" else linear_guidance_ramp(1 + GUIDANCE[family], model.steps)
    rows = []
    for batch in setup.compiled_sample_batches if compiled else setup.sample_batches:
        reset_memory(device)
        labels_B = torch.arange(batch, device=device) % model.config.num_classes

        seconds = []
        for _ in range(1 + repeats):  # the first call warms up (compiled: compiles)
            start = time.perf_counter()
            with autocast(device):
                generator = torch.Generator(device=device).manual_seed(SEED)
                model.generate(labels_B, cfg_scale=cfg_scale, generator=generator,
                               compiled=setup.compile_backend if compiled else False)  # fmt: skip
            sync(device)
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds[1:])
        what = "cfg_scale 2.0" if family == "gpt" else "VAR's cfg 1.5 ramp"
        note = f"{what}, {model.steps} steps, tokens only"
        if compiled:
            note += f", {setup.compile_backend}: first call {seconds[0]:.1f} s"
        rows.append(Row(family, f"sample b{batch}" + (" compiled" if compiled else ""), batch, median,
                        images_per_s=batch / median, memory_gib=memory_gib(device), note=note))  # fmt: skip
    if compiled:
        torch._dynamo.reset()  # drop the compiled graphs (and the model they hold)
    return rows


# -- FSDP smoke (a child process under accelerate's FSDP profile) --------------------------------


def fsdp_row(family: str, setup: Setup, args) -> Row:
    """Launch this script as ``--fsdp-child`` under ``accelerate launch --config_file
    accelerate/fsdp.yaml --num_processes 1`` and read the JSON line it prints."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    child = [str(Path(__file__).resolve()), "--fsdp-child", family, *(["--tiny"] if args.tiny else [])]
    command = [accelerate, "launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "1",
               "--main_process_port", "0", *child]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    found = [line for line in result.stdout.splitlines() if line.startswith("FSDP_RESULT ")]
    if result.returncode != 0 or not found:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return Row(family, "fsdp smoke", setup.batch[family], note="FAILED: " + " | ".join(tail), ok=False)
    info = json.loads(found[-1].removeprefix("FSDP_RESULT "))
    return Row(family, "fsdp smoke", setup.batch[family], info["seconds"], memory_gib=info["memory_gib"], ok=info["ok"],
               note=info["note"], extra=info)  # fmt: skip


def fsdp_child(family: str, setup: Setup) -> None:
    """Runs under ``accelerate launch``: the stages' build_accelerator -> prepare -> compile_model
    order, a few steps, then the full state dict gathered as the stages write it."""
    from accelerate.utils import DistributedType

    from core.training import build_accelerator

    accelerator = build_accelerator("bf16" if torch.cuda.is_available() else "no")
    device = accelerator.device
    raw_model = build_model(family, setup, device).train()
    optimizer = torch.optim.AdamW(raw_model.param_groups(0.05), lr=1e-4)
    prepared, optimizer = accelerator.prepare(raw_model, optimizer)
    # the stages' compile_model, with the setup's backend (tiny: dynamo only, inductor takes minutes)
    model = torch.compile(prepared, backend=setup.fsdp_compile_backend)
    tokens_BL, labels_B = random_batch(raw_model, setup.batch[family], device)
    reset_memory(device)
    seconds, losses = [], []
    for _ in range(setup.fsdp_steps):
        sync(device)
        start = time.perf_counter()
        with accelerator.autocast():
            logits_BLV = model(tokens_BL, labels_B, label_dropout=False)
        loss = F.cross_entropy(logits_BLV.float().flatten(0, 1), tokens_BL.flatten())
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
    state = accelerator.get_state_dict(prepared)  # what accelerate registered: the module, not the wrapper
    bare = build_model(family, setup, torch.device("cpu")).state_dict()
    same_keys = set(state) == set(bare) and all(tuple(state[k].shape) == tuple(bare[k].shape) for k in bare)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    finite = all(torch.isfinite(torch.tensor(losses)).tolist())
    listed = ", ".join(f"{x:.3f}" for x in losses)
    note = (f"{accelerator.distributed_type.value}, {setup.fsdp_compile_backend} compile, losses {listed}, "
            f"full state dict {'matches' if same_keys else 'DIFFERS'}")  # fmt: skip
    if not sharded:
        note += " (accelerate applies FSDP on CUDA only: ran unsharded)"
    result = {"ok": finite and same_keys and (sharded or device.type == "cpu"), "sharded": sharded,
              "seconds": statistics.median(seconds[1:] or seconds), "losses": losses,
              "memory_gib": memory_gib(device), "note": note}  # fmt: skip
    if accelerator.is_main_process:
        print("FSDP_RESULT " + json.dumps(result), flush=True)


# -- report ------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[Row]) -> None:
    header = ("family", "row", "batch", "s (median)", "tokens/s", "MFU", "images/s", "peak mem GiB", "note")
    cells = [
        (r.family, r.what, str(r.batch), fmt(r.seconds, ".4f"), fmt(r.tokens_per_s, ",.0f"), fmt(r.mfu, ".1%"),
         fmt(r.images_per_s, ",.1f"), fmt(r.memory_gib, ".2f"), r.note)
        for r in rows
    ]  # fmt: skip
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]

    def line(row) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, 1, 8) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    print()
    print(line(header))
    print(line(["-" * w for w in widths]))
    for row in cells:
        print(line(row))
    print()


def guarded(family: str, what: str, batch: int, fn, *fn_args) -> list[Row]:
    """Run one measurement; a failure becomes a FAILED row so the rest of the check still runs."""
    start = time.perf_counter()
    try:
        result = fn(*fn_args)
        rows = result if isinstance(result, list) else [result]
        print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)
        return rows
    except Exception as error:  # noqa: BLE001 - reported in the table, the check goes on
        traceback.print_exc()
        return [Row(family, what, batch, note=f"FAILED: {type(error).__name__}: {error}"[:200], ok=False)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = setup_for(args)
    if args.fsdp_child:
        fsdp_child(args.fsdp_child, setup)
        return 0
    from core.training import matmul_peak_flops

    device = device_for(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = matmul_peak_flops(device, dtype, size=setup.peak_size, seconds=1.0 if device.type == "cuda" else 0.2)
    print(
        f"gpu check ({setup.name}): {name}, {str(dtype).removeprefix('torch.')}, peak {peak / 1e12:.3f} TFLOP/s "
        f"measured; batch {setup.batch}, {setup.steps} timed steps after {setup.warmup}; torch {torch.__version__}",
        flush=True,
    )
    families = FAMILIES if args.family == "both" else (args.family,)
    rows: list[Row] = []
    for family in families:
        print(f"{family}: training eager ...", flush=True)
        rows += guarded(family, "train eager", setup.batch[family], train_row, family, setup, device, peak, False)
        if not args.skip_compile:
            print(f"{family}: training compiled ({setup.compile_backend}) ...", flush=True)
            rows += guarded(family, "train compiled", setup.batch[family], train_row, family, setup, device, peak, True)
        if not args.skip_fsdp:
            print(f"{family}: FSDP smoke (accelerate/fsdp.yaml, one process) ...", flush=True)
            rows += guarded(family, "fsdp smoke", setup.batch[family], fsdp_row, family, setup, args)
        print(f"{family}: sampling at batch {', '.join(map(str, setup.sample_batches))} ...", flush=True)
        rows += guarded(family, "sample", 0, sample_rows, family, setup, device, args.sample_repeats)
        if not args.skip_compile:
            print(f"{family}: sampling compiled ({setup.compile_backend}) at batch "
                  f"{', '.join(map(str, setup.compiled_sample_batches))} ...", flush=True)  # fmt: skip
            rows += guarded(family, "sample compiled", 0, sample_rows, family, setup, device, args.sample_repeats, True)
    print_table(rows)
    failed = [f"{r.family} {r.what}" for r in rows if not r.ok]
    print(f"failed: {', '.join(failed)}" if failed else "every row ran")
    figures = {"setup": setup.__dict__, "device": name, "dtype": str(dtype), "peak_flops": peak,
               "rows": [r.__dict__ for r in rows], "failed": failed}  # fmt: skip
    peak_key = "gpu_bf16" if device.type == "cuda" else "cpu_fp32_check"
    write_results(
        "gpu_check" if setup.name == "full" else "gpu_check_tiny",
        figures,
        peaks={peak_key: peak},
        argv=None if argv is None else ["benchmarks/gpu_check.py", *argv],
    )
    print(f"whole check: {time.perf_counter() - SCRIPT_START:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
