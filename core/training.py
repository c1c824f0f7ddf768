"""What every training stage shares: the Accelerator, seeding, resumable state and loss checks.

A stage builds its model and optimizers, then::

    accelerator = build_accelerator(cfg.mixed_precision)
    resume = Resume(accelerator, resume_dir(paths.resume, STAGE, cfg, [paths.shards]), cfg.save_every)
    model, opt = accelerator.prepare(model, opt)
    start, history = resume.restore()    # 0, or the step after the last saved one
    for step in range(start, steps):
        ...
        check_finite({"loss": loss}, step, resume)
        resume.step_done(step + 1, history)  # saves every ``save_every`` steps
    resume.finish()                      # the run succeeded: the state is removed

The resume directory is ``<root>/<stage>/<hash of the params section + md5 of the inputs>/``, so
a changed param or input never continues from a stale state. accelerate's ``save_state`` writes
the prepared models, optimizers and RNG states (``torch.save`` files, local and self-written, so
``DESIGN.md`` allows them); ``state.json`` beside them records the step and marks the checkpoint
complete. This module imports no ``models``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState

STATE_FILE = "state.json"


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf; the message names the step and where the last good state is."""


def step_bar(stage: str, start: int, steps: int, accelerator: Accelerator):
    """The training loop's iterator: steps ``start .. steps-1`` with a progress bar on the main
    process only (a resumed run starts the bar at ``start``)."""
    from core.progress import progress

    return progress(range(start, steps), desc=stage, unit="step", initial=start, total=steps,
                    disable=not accelerator.is_main_process)  # fmt: skip


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_cpu() -> bool:
    """CPU when there is no GPU or ``ACCELERATE_USE_CPU`` is set (accelerate's multi-process
    launcher does not pass ``use_cpu`` on to the ranks, so every stage decides here)."""
    from accelerate.utils import parse_flag_from_env

    return not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")


def process_state() -> PartialState:
    """accelerate's process state (rank, world size), gloo on CPU (see ``use_cpu``).

    A bare ``PartialState()`` ignores ``ACCELERATE_USE_CPU``: on a CPU-only machine every rank of a
    launch would then believe it is the only process and write the outs itself.
    """
    return PartialState(cpu=use_cpu())


def build_accelerator(mixed_precision: str = "no") -> Accelerator:
    """One Accelerator per stage run: CPU when there is no GPU, deterministic kernels on CPU.

    ``mixed_precision`` is "no", "bf16" or "fp16" (from params.yaml, never from the launcher).
    """
    cpu = use_cpu()
    if cpu:
        deterministic_kernels()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def deterministic_kernels() -> None:
    """``torch.use_deterministic_algorithms(True)`` without its 2.6 s import of TorchInductor.

    The public call imports ``torch._inductor.config`` only to set its ``deterministic`` flag; a stage
    process that never compiles pays that import for nothing (12 stages: ~30 s of ``arpipe run`` on
    2 cores). Set the same kernel flag here, and Inductor's when it is already loaded;
    ``compile_model`` sets Inductor's before it compiles.
    """
    torch._C._set_deterministic_algorithms(True)
    if "torch._inductor.config" in sys.modules:
        sys.modules["torch._inductor.config"].deterministic = True


def step_generator(seed: int, step: int, purpose: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, purpose): resumed runs draw the same numbers."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 31 + purpose)


def fingerprint_inputs(inputs: Iterable[str | Path]) -> str:
    """md5 over every file of the input paths (folders walked in sorted order), names included."""
    digest = hashlib.md5()
    for root in inputs:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            digest.update(str(file.relative_to(root) if root.is_dir() else file.name).encode())
            with file.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def resume_dir(root: str | Path, stage: str, params: Any, inputs: Iterable[str | Path]) -> Path:
    """``<root>/<stage>/<16 hex digits of sha256(params JSON + md5 of inputs)>``."""
    if dataclasses.is_dataclass(params):
        params = dataclasses.asdict(params)
    key = json.dumps(params, sort_keys=True, default=str) + fingerprint_inputs(inputs)
    return Path(root) / stage / hashlib.sha256(key.encode()).hexdigest()[:16]


class Resume:
    """Save the accelerator's registered state every ``save_every`` steps; restore the latest."""

    def __init__(self, accelerator: Accelerator, directory: str | Path, save_every: int, keep: int = 2):
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.save_every = save_every
        self.keep = keep
        self.last_saved: Path | None = None

    def _checkpoints(self) -> list[Path]:
        """Complete checkpoints (with state.json), oldest first."""
        found = [p for p in self.directory.glob("checkpoint_*") if (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name.rsplit("_", 1)[1]))

    def has_state(self) -> bool:
        """Whether a saved state exists (``restore`` would resume instead of starting fresh)."""
        return bool(self._checkpoints())

    def restore(self) -> tuple[int, Any]:
        """Load the latest complete checkpoint: (the step to continue from, the ``extra`` saved with
        it); (0, []) when there is none."""
        checkpoints = self._checkpoints()
        if not checkpoints:
            return 0, []
        latest = checkpoints[-1]
        self.accelerator.load_state(str(latest))
        self.last_saved = latest
        state = json.loads((latest / STATE_FILE).read_text())
        self.accelerator.print(f"resuming from step {state['step']} ({latest})")
        return int(state["step"]), state["extra"]

    def step_done(self, step: int, extra: Any = None, *, force: bool = False) -> None:
        """Call after ``step`` optimizer steps have completed; saves on multiples of save_every.

        ``extra`` (JSON: e.g. the logged loss history) is stored with the state and given back by
        ``restore``, so outs written from it match an uninterrupted run's."""
        if self.save_every <= 0 or (step % self.save_every and not force):
            return
        target = self.directory / f"checkpoint_{step:09d}"
        self.accelerator.save_state(str(target))
        if self.accelerator.is_main_process:
            (target / STATE_FILE).write_text(
                json.dumps({"step": step, "extra": extra if extra is not None else []}) + "\n"
            )
            for old in self._checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.last_saved = target

    def finish(self) -> None:
        """The run succeeded: remove the resume state."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            shutil.rmtree(self.directory, ignore_errors=True)


def new_history(names: Iterable[str]) -> dict:
    """A training history (JSON, part of the resume state): the logged rows and the running window
    of the per-step values ``names``."""
    return {"train": [], "window": {"steps": 0, **dict.fromkeys(names, 0.0)}}


def add_to_window(history: dict, values: Mapping[str, float]) -> None:
    """Add one step's ``values`` to the history's window."""
    window = history["window"]
    for name, value in values.items():
        window[name] += value
    window["steps"] += 1


def log_window(history: dict, tracker, *, step: int, lr: float, grad_norm: float, **first) -> dict:
    """Close the window into a row ``{step, **first, <window means>, lr, grad_norm}``: appended to
    ``history["train"]`` and logged as ``train/<key>`` at ``step``; the window starts again."""
    window = history["window"]
    names = [name for name in window if name != "steps"]
    row = {"step": step, **first, **{name: window[name] / window["steps"] for name in names}}
    row.update(lr=lr, grad_norm=grad_norm)
    history["train"].append(row)
    tracker.log_metrics({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)
    window.update(steps=0, **dict.fromkeys(names, 0.0))
    return row


def check_finite(losses: Mapping[str, torch.Tensor | float], step: int, resume: Resume | None = None) -> None:
    """Raise ``NonFiniteLossError`` naming the step and the loss terms that are NaN or inf.

    Call before the optimizer step, so the last saved state stays the last good one.
    """
    values = {name: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for name, v in losses.items()}
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if not bad:
        return
    terms = ", ".join(f"{name}={value}" for name, value in bad.items())
    where = f"; the last good state is kept in {resume.last_saved}" if resume and resume.last_saved else ""
    raise NonFiniteLossError(
        f"non-finite loss at step {step} ({terms}){where}. Lower the learning rate or enable "
        "gradient clipping, then re-run the stage (it resumes from the last good state)."
    )


def warmup_decay_lr(step: int, *, steps: int, lr: float, warmup_steps: int, min_lr_ratio: float, decay: str) -> float:
    """Learning rate at ``step`` (0-based): linear warmup from lr/warmup to lr over ``warmup_steps``,
    then ``decay`` ("cosine", "linear" or "constant") down to ``min_lr_ratio·lr`` at the last step.
    A function of the step alone, so a resumed run needs no scheduler state."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if decay == "constant":
        return lr
    progress = (step - warmup_steps) / max(steps - warmup_steps - 1, 1)
    progress = min(max(progress, 0.0), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * shape)


class EMA:
    """Exponential moving average of a model's floating-point parameters, kept in fp32.

    ``update(model)`` after each optimizer step; ``copy_to(model)`` writes the averages into a model
    of the same architecture. Has ``state_dict``/``load_state_dict``, so
    ``accelerator.register_for_checkpointing(ema)`` makes it part of the resume state.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.dtype.is_floating_point
        }

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.shadow = {name: t.float().clone() for name, t in state["shadow"].items()}


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5
) -> float:
    """Measured dense-matmul throughput (FLOP/s) of ``device`` at ``dtype``: the denominator of MFU.

    Square ``size`` matmuls for about ``seconds`` after a warm-up; the best of three timings, so a
    busy moment does not understate the peak. Measured per run instead of hard-coded, since the
    same code runs on 2 CPU cores and on GPUs.
    """
    import time

    # A private generator: measuring must not advance the global RNG a resumed run restores.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    a @ b
    sync()
    one = max(time.perf_counter() - start, 1e-6)
    repeats = max(1, int(seconds / 3 / one))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * size**3 / best


def compile_model(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """The prepared model, wrapped by ``torch.compile`` when ``enabled`` (the stage's ``compile``).

    The order, as in torchtitan (wrapping applied from outside, the model code single-device)::

        raw_model = build(...).to(device)                        # the bare module
        model, optimizer = accelerator.prepare(raw_model, opt)  # DDP / FSDP2 wrap, autocast
        model = compile_model(model, cfg.compile)               # compile the wrapped module
        start, history = resume.restore()                       # accelerate's load_state

    accelerate keeps the *prepared* module registered, not the compiled wrapper, so ``save_state``
    and ``load_state`` see the same module and state-dict keys with and without compile (no
    ``_orig_mod.`` prefix) and a resumed compiled run ends byte-identical to an uninterrupted one
    (tested on CPU). ``raw_model`` stays the bare eager module for saving, evaluation and sampling;
    only the training forward (and its backward) goes through the compiled graph, which is built on
    the first step (seconds to minutes: it pays on GPUs, see benchmarks/gpu_check.py).
    """
    if not enabled:
        return model
    import torch._inductor.config as inductor_config

    inductor_config.deterministic = torch.are_deterministic_algorithms_enabled()
    return torch.compile(model)


def recorded_config(cfg: Any) -> dict[str, Any]:
    """A stage config as config.json records it (``stage_config``): every field, except
    ``compile`` when off, so that an eager run's artifacts stay byte-identical to those written
    before the key existed; a compiled run (other kernels, other rounding) records ``compile: true``."""
    record = dataclasses.asdict(cfg)
    if not record.get("compile", True):
        del record["compile"]
    return record
