"""``arpipe plan``'s time table: each stage's work (arpipe/stage_work.py) over a measured or assumed rate.

- CPU, measured: ``benchmarks/stage_times.py`` reads a finished ``arpipe run`` from MLflow and
  stores, per stage, its efficiency: estimated FLOPs ÷ measured seconds ÷ the CPU's fp32 matmul
  peak (``core.training.matmul_peak_flops``). Here a stage takes FLOPs ÷ (efficiency × the peak
  measured now), so a faster CPU scales; ``shard`` (no FLOPs model) takes its seconds per image ×
  the ratio of the peaks; the time between stages (process starts, DVC, Prefect, MLflow) is added
  as measured. A stage the calibrating run did not time gets the median efficiency (marked ``*``).
  Fixed costs (process start, model loading) are folded into each efficiency, so an estimate is
  exact at the calibrated size and errs high when the work grows.
- One GPU, assumed (none was measured): FLOPs ÷ (peak × MFU), but never less than the launch
  floor of its sequential work: ``GPU_STEP_FLOOR_S`` per optimizer step, ``GPU_PASS_FLOOR_S`` per
  sampling forward pass, ``GPU_ODE_STEP_FLOOR_S`` per flow-map ODE step (eager PyTorch: tiny models
  are launch-bound). ``shard`` and the time between stages are CPU work, as measured.

A missing or malformed calibration file does not stop the plan: the table is marked UNCALIBRATED
and the CPU column assumes ``UNCALIBRATED_EFFICIENCY`` of the peak and ``UNCALIBRATED_SHARD_S``
per image, with the reason in the footnote.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from arpipe.stage_work import Images, StageWork

STAGE_TIMES = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "stage_times.json"
GPU_PEAK_TFLOPS = 989.0  # one H100 SXM, dense bf16 (NVIDIA's datasheet: 1,979 with 2:4 sparsity)
GPU_MFU = 0.35  # assumed share of that peak: eager bf16 training of a mid-size transformer
GPU_STEP_FLOOR_S = 0.010  # per optimizer step: forward, backward, clip, AdamW launches + a host sync
GPU_PASS_FLOOR_S = 0.001  # per sequential no-grad forward pass (a sampling step of a batch)
GPU_ODE_STEP_FLOOR_S = 0.0002  # per flow-map ODE step (a handful of small kernels)
UNCALIBRATED_EFFICIENCY = 0.3  # between the measured conv-net (~0.1) and transformer (~0.6) stages
UNCALIBRATED_SHARD_S = 0.005  # seconds per image


@dataclass(frozen=True)
class Calibration:
    efficiency: dict[str, float]  # stage -> effective FLOP/s ÷ the CPU matmul peak
    shard_seconds_per_image: float
    shard_source: str  # what the calibrating run sharded: decoding cost depends on it
    between_stages_seconds: float
    peak_flops: float  # the CPU matmul peak the efficiencies are relative to
    source: str  # what was measured, when (for the footnote)
    problem: str = ""  # why there is no calibration ("" = calibrated)

    @classmethod
    def uncalibrated(cls, problem: str) -> Calibration:
        return cls({}, UNCALIBRATED_SHARD_S, "", 0.0, 0.0, "", problem)


def load_calibration(path: Path = STAGE_TIMES) -> Calibration:
    """The efficiencies in ``path`` (benchmarks/stage_times.py's output); never raises."""
    try:
        record = json.loads(Path(path).read_text())
        figures = record["figures"]
        stages = figures["stages"]
        efficiency = {name: float(s["efficiency"]) for name, s in stages.items() if name != "shard"}
        shard = float(stages["shard"]["seconds_per_image"]) if "shard" in stages else UNCALIBRATED_SHARD_S
        calibration = Calibration(
            efficiency=efficiency,
            shard_seconds_per_image=shard,
            shard_source=str(stages.get("shard", {}).get("source", "an unnamed source")),
            between_stages_seconds=float(figures["between_stages_seconds"]),
            peak_flops=float(figures["peak_flops"]),
            source=_source(record),
        )
    except FileNotFoundError:
        return Calibration.uncalibrated(f"{path} does not exist (run benchmarks/stage_times.py)")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return Calibration.uncalibrated(f"{path} is malformed ({type(exc).__name__}: {exc})")
    rates = [*efficiency.values(), shard, calibration.peak_flops]
    if not efficiency or any(not math.isfinite(v) or v <= 0 for v in rates):
        return Calibration.uncalibrated(f"{path} is malformed (an efficiency or peak is not a positive number)")
    return calibration


def _source(record: dict) -> str:
    """``the 1096 s pipeline run of 2026-12-07 14:10 UTC (1,797 images; calibrated 2026-12-07)``."""
    figures, run = record["figures"], record["figures"]["pipeline_run"]
    start = dt.datetime.fromisoformat(run["start"]).strftime("%Y-%m-%d %H:%M UTC")
    images = figures["images"]["train"] + figures["images"]["val"]
    return f"the {run['seconds']:.0f} s pipeline run of {start} ({images:,} images; calibrated {record['date'][:10]})"


@dataclass(frozen=True)
class GpuAssumption:
    peak_tflops: float = GPU_PEAK_TFLOPS
    mfu: float = GPU_MFU

    def seconds(self, work: StageWork) -> float:
        w = work.work
        floor = w.optimizer_steps * GPU_STEP_FLOOR_S + w.forward_passes * GPU_PASS_FLOOR_S
        return max(w.flops / (self.peak_tflops * 1e12 * self.mfu), floor + w.ode_steps * GPU_ODE_STEP_FLOOR_S)


@dataclass(frozen=True)
class CpuPeak:
    """The CPU's fp32 matmul peak the estimate scales to: measured now, or given by the user."""

    flops: float
    threads: int  # torch threads, which the stages use too
    given: bool = False

    def describe(self) -> str:
        if self.given:
            return f"the fp32 matmul peak given (--cpu-peak-gflops), {self.flops / 1e9:.0f} GFLOP/s"
        return (
            f"the fp32 matmul peak measured now, {self.flops / 1e9:.0f} GFLOP/s at {self.threads} torch threads "
            f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: a busy machine measures lower)"
        )


@dataclass(frozen=True)
class StageTime:
    stage: str
    what: str
    flops: float
    cpu_seconds: float
    gpu_seconds: float
    cpu_note: str = ""  # "*": no calibrated run of this stage


@dataclass(frozen=True)
class TimeTable:
    rows: list[StageTime]  # the stages, then the time between them
    images: Images

    @property
    def cpu_seconds(self) -> float:
        return sum(r.cpu_seconds for r in self.rows)

    @property
    def gpu_seconds(self) -> float:
        return sum(r.gpu_seconds for r in self.rows)

    def per_thousand_images(self, seconds: float) -> float:
        return seconds / self.images.total * 1000


def estimate(works: list[StageWork], images: Images, calibration: Calibration, cpu_peak_flops: float,
             gpu: GpuAssumption) -> TimeTable:  # fmt: skip
    """Seconds per stage on a CPU of ``cpu_peak_flops`` and on one GPU."""
    measured = calibration.efficiency
    fallback = statistics.median(measured.values()) if measured else UNCALIBRATED_EFFICIENCY
    cpu_scale = calibration.peak_flops / cpu_peak_flops if calibration.peak_flops else 1.0
    rows = []
    for w in works:
        if w.stage == "shard":  # CPU work on either machine
            seconds = w.images * calibration.shard_seconds_per_image * cpu_scale
            rows.append(StageTime(w.stage, w.what, 0.0, seconds, seconds))
            continue
        efficiency = measured.get(w.stage, fallback)
        note = "" if w.stage in measured or calibration.problem else "*"
        rows.append(StageTime(w.stage, w.what, w.work.flops, w.work.flops / (efficiency * cpu_peak_flops),
                              gpu.seconds(w), note))  # fmt: skip
    if calibration.between_stages_seconds:
        between = calibration.between_stages_seconds
        rows.append(StageTime("between stages", "process starts, DVC, Prefect, MLflow (fixed)", 0.0, between, between))
    return TimeTable(rows, images)


def time_table(params: dict, num_classes: int, images: int, images_from: str, gpu: GpuAssumption,
               cpu_peak_flops: float | None, stage_times: Path = STAGE_TIMES) -> str:  # fmt: skip
    """``arpipe plan``'s time table for ``images`` (``images_from``: where the count came from),
    with the cost of 1,000 more; the CPU peak is measured unless given."""
    import torch

    from arpipe.stage_work import model_costs, stage_works
    from core.training import matmul_peak_flops

    threads = torch.get_num_threads()
    if cpu_peak_flops:
        cpu = CpuPeak(cpu_peak_flops, threads, given=True)
    else:
        cpu = CpuPeak(matmul_peak_flops(torch.device("cpu")), threads)
    costs, calibration = model_costs(params, num_classes), load_calibration(stage_times)
    tables = []
    for count in (images, images + 1000):
        split = Images.split(count, params["shard"]["val_fraction"])
        tables.append(estimate(stage_works(params, costs, split, num_classes), split, calibration, cpu.flops, gpu))
    return format_times(*tables, calibration, cpu, gpu, images_from=images_from)


def human_seconds(seconds: float) -> str:
    for limit, unit in ((365.25 * 86400, "years"), (86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= limit:
            return f"{seconds / limit:.1f} {unit}"
    if seconds < 0.1:
        return "<0.1 s"
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def format_times(table: TimeTable, more: TimeTable, calibration: Calibration, cpu: CpuPeak, gpu: GpuAssumption,
                 images_from: str = "") -> str:  # fmt: skip
    """The table; ``more``: the same params with 1,000 more images (the marginal cost);
    ``images_from``: where the image count came from."""
    from arpipe.plan import human_units

    images = table.images
    title = "UNCALIBRATED estimate" if calibration.problem else "Estimated time"
    lines = [
        f"{title} for {images.total:,} images ({images_from + '; ' if images_from else ''}"
        f"{images.train:,} train, {images.val:,} val):",
        "",
        f"| stage | work | FLOPs | CPU, {cpu.threads} thread{'s' if cpu.threads > 1 else ''} | 1 GPU (assumed) |",
        "|---|---|---|---|---|",
    ]
    for r in table.rows:
        flops = human_units(r.flops, "FLOP") if r.flops else "–"
        gpu_cell = human_seconds(r.gpu_seconds) + (" (CPU)" if not r.flops else "")
        lines.append(f"| {r.stage} | {r.what} | {flops} | {human_seconds(r.cpu_seconds)}{r.cpu_note} | {gpu_cell} |")
    flops = human_units(sum(r.flops for r in table.rows), "FLOP")
    lines.append(f"| total | | {flops} | {human_seconds(table.cpu_seconds)} | {human_seconds(table.gpu_seconds)} |")
    lines.append(f"| per 1,000 images | | | {human_seconds(table.per_thousand_images(table.cpu_seconds))} "
                 f"| {human_seconds(table.per_thousand_images(table.gpu_seconds))} |")  # fmt: skip
    lines.append(f"| each further 1,000 images | | | +{human_seconds(more.cpu_seconds - table.cpu_seconds)} "
                 f"| +{human_seconds(more.gpu_seconds - table.gpu_seconds)} |")  # fmt: skip
    lines += ["", _cpu_footnote(calibration, cpu), _gpu_footnote(gpu)]
    if any(r.cpu_note for r in table.rows):
        lines.append("* not timed in the calibrating run: the median efficiency of the stages that were.")
    return "\n".join(lines) + "\n"


def _cpu_footnote(calibration: Calibration, cpu: CpuPeak) -> str:
    now = cpu.describe()
    if calibration.problem:
        return (f"CPU (UNCALIBRATED: {calibration.problem}): assumes {UNCALIBRATED_EFFICIENCY:.0%} of {now} for "
                f"every stage and {UNCALIBRATED_SHARD_S * 1000:g} ms per image for shard; time between stages "
                "not counted.")  # fmt: skip
    return (
        f"CPU (measured): per-stage efficiency from {calibration.source}, at "
        f"{calibration.peak_flops / 1e9:.0f} GFLOP/s peak then; scaled to {now}. shard: "
        f"{calibration.shard_seconds_per_image * 1000:.1f} ms per image as measured on {calibration.shard_source} "
        "(photos decode slower)."
    )


def _gpu_footnote(gpu: GpuAssumption) -> str:
    return (
        f"GPU (assumed, not measured): one H100 SXM-class GPU at {gpu.peak_tflops:g} TFLOP/s (dense bf16) x "
        f"{gpu.mfu:.0%} MFU, each stage at least {GPU_STEP_FLOOR_S * 1000:g} ms per optimizer step + "
        f"{GPU_PASS_FLOOR_S * 1000:g} ms per sampling pass + {GPU_ODE_STEP_FLOOR_S * 1000:g} ms per ODE step "
        "(launch overhead); shard and the time between stages as on the CPU; "
        "--gpu-peak-tflops, --gpu-mfu replace the first two."
    )
