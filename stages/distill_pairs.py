"""distill_pairs: a teacher checkpoint -> (label, noise, tokens) pairs through the flow-matching map.

Reads ``paths.models/<teacher>`` (the last checkpoint of the post-training chain; either family)
and the tokenizer in ``paths.tokenizer`` (its codebook is the map's embedding space, VAR's
quantizer builds the teacher's inputs). Draws ``count`` rows: label ``n mod num_classes``
(class-balanced) and Gaussian noise (L positions × D code dimensions) from a generator seeded per
row, and sends the noise through the teacher's KV-cached sampling with every draw replaced by
DD1's deterministic flow-matching map (models/dd.py): one map per token (GPT) or per scale, all
positions in parallel (VAR), with the teacher's guidance ``cfg_scale`` and filters. No images needed.

Writes ``paths.distill/pairs.parquet`` (core/pair_store.py: noise as a fixed-size float32 list of
L·D values per row, tokens as a fixed-size uint16 list, the teacher's name and fingerprint and the
map's settings in the schema metadata) and ``metrics/distill_pairs.json``: counts and the sanity
check of the map, the mean teacher entropy per token against the mean NLL of the mapped tokens
(equal in expectation when the tokens follow the teacher). Deterministic: the same params and
teacher give byte-identical pairs on a given device. Run by DVC as ``python -m stages.distill_pairs``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from core.checkpoint import read_checkpoint
from core.config import Paths
from core.pair_store import PairWriter
from core.stage import stage_main
from core.training import deterministic_kernels, process_state, use_cpu
from models.ar import ar_from_state, tokenizer_from_state
from models.dd import code_space, map_teacher, ode_grid
from models.sampling import GuidanceScheduleName, family_filters, guidance_per_step

STAGE = "distill_pairs"
PAIRS_FILE = "pairs.parquet"


@dataclass(frozen=True, kw_only=True)
class Config:
    teacher: str = "ddo"
    """Checkpoint folder under ``paths.models`` to distil (the chain's last: base -> sar -> cca -> ddo)."""
    count: int = 6000
    """Pairs N to generate (DD1's FID keeps improving with N; each costs one teacher sampling)."""
    batch_size: int = 500
    """Rows sampled together (one KV cache); the pairs do not depend on it."""
    cfg_scale: float = 1.0
    """Teacher guidance baked into the pairs (logits = u + cfg_scale·(c − u); 1.0 = guidance-free, the
    natural choice for a CCA/DDO teacher). The student cannot apply guidance afterwards."""
    guidance_schedule: GuidanceScheduleName = "auto"
    """How ``cfg_scale`` is spread over the teacher's steps: ``constant``, ``linear`` (1.0 at the first
    step up to ``cfg_scale`` at the last: VAR's ramp) or ``auto``, the family's (gpt: constant, var: linear)."""
    temperature: float = 1.0
    top_k: int | Literal["auto"] = "auto"
    """0 = off; ``auto``: the family's (gpt: off, var: 900, capped at the vocabulary)."""
    top_p: float | Literal["auto"] = "auto"
    """1.0 = off; ``auto``: the family's (gpt: off, var: 0.96)."""
    ode_steps: int = 64
    """Euler (= DDIM) steps of each token's ODE from t = 1 to t_min."""
    t_min: float = 0.01
    """Where the ODE stops and snaps to the most likely codeword (1/t terms forbid 0)."""
    spacing: Literal["geometric", "linear"] = "geometric"
    """ODE time grid: evenly in log t (dense near 0) or in t."""
    seed: int = 0

    def __post_init__(self):
        if self.count < 1 or self.batch_size < 1 or self.ode_steps < 1:
            raise ValueError("count, batch_size and ode_steps must be >= 1")
        if not 0.0 < self.t_min < 1.0:
            raise ValueError(f"t_min must be in (0, 1), got {self.t_min}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (the map needs a distribution), got {self.temperature}")
        if not self.teacher or "/" in self.teacher:
            raise ValueError(f"teacher must be a checkpoint folder name under paths.models, got {self.teacher!r}")


def load_teacher(cfg: Config, paths: Paths):
    """(teacher, its config, tokenizer, tokenizer config) on the CPU, eval mode."""
    tok_state, tok_config = read_checkpoint(paths.tokenizer, stage="train_tokenizer")
    tokenizer = tokenizer_from_state(tok_state, tok_config)
    teacher_dir = Path(paths.models) / cfg.teacher
    state, config = read_checkpoint(teacher_dir, stage=f"the stage that writes {cfg.teacher}")
    if config.get("distilled"):
        raise ValueError(f"{teacher_dir} is a distilled student; distill_pairs.teacher must be an AR checkpoint")
    if config["tokenizer_fingerprint"] != tok_config["fingerprint"]:
        raise ValueError(f"{teacher_dir} was trained on another tokenizer; re-run the stages after train_tokenizer")
    return ar_from_state(state, config, tokenizer).requires_grad_(False), config, tokenizer, tok_config


def row_noise(cfg: Config, start: int, rows: int, seq_len: int, code_dim: int) -> torch.Tensor:
    """Noise (rows, L, D) fp32 of rows start.. start+rows-1, each from its own CPU generator seeded
    by (seed, row): a row's noise depends neither on the device nor on the batch size."""
    return torch.stack(
        [
            torch.randn(seq_len, code_dim, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + row))
            for row in range(start, start + rows)
        ]
    )


def run(cfg: Config, paths: Paths, tracker) -> dict:
    from core.progress import progress

    device = torch.device("cpu" if use_cpu() else "cuda")
    if device.type == "cpu":
        deterministic_kernels()
    teacher, teacher_config, tokenizer, tok_config = load_teacher(cfg, paths)
    teacher.to(device)
    tokenizer.to(device)
    codebook_VD, factor = code_space(tokenizer)
    codebook_VD = codebook_VD.to(device)
    grid = ode_grid(cfg.ode_steps, cfg.t_min, cfg.spacing)
    seq_len, code_dim, num_classes = teacher.config.seq_len, codebook_VD.shape[1], teacher.num_classes
    arch = teacher_config["arch"]
    guidance = guidance_per_step(cfg.cfg_scale, cfg.guidance_schedule, arch=arch, steps=teacher.steps)
    top_k, top_p = family_filters(cfg.top_k, cfg.top_p, arch=arch, vocab_size=teacher.config.vocab_size)
    meta = {
        "teacher": cfg.teacher,
        "teacher_fingerprint": teacher_config["fingerprint"],
        "arch": teacher_config["arch"],
        "tokenizer_fingerprint": tok_config["fingerprint"],
        "token_layout": teacher_config["token_layout"],
        "seq_len": seq_len,
        "code_dim": code_dim,
        "code_space_factor": factor,
        "vocab_size": teacher.config.vocab_size,
        "num_classes": num_classes,
        "stage_config": dataclasses.asdict(cfg),
    }
    out = Path(paths.distill) / PAIRS_FILE
    print(
        f"{STAGE}: {cfg.count} pairs from {paths.models}/{cfg.teacher} ({meta['arch']}, {teacher.steps} steps, "
        f"cfg_scale {cfg.cfg_scale:g}) through a {cfg.ode_steps}-step flow-matching map to t_min {cfg.t_min:g}, "
        f"noise {seq_len}x{code_dim} per image -> {out}"
    )
    writer = PairWriter(out, meta)
    entropy_sum = nll_sum = 0.0
    token_counts = np.zeros(teacher.config.vocab_size, dtype=np.int64)
    start_time = time.perf_counter()
    batches = range(0, cfg.count, cfg.batch_size)
    try:
        for start in progress(batches, desc=STAGE, unit="batch"):
            rows = min(cfg.batch_size, cfg.count - start)
            labels_B = torch.arange(start, start + rows) % num_classes
            noise_BLD = row_noise(cfg, start, rows, seq_len, code_dim)
            statistics: dict = {}
            tokens_BL = map_teacher(
                teacher, labels_B.to(device), noise_BLD.to(device), codebook_VD, grid, cfg_scale=guidance,
                temperature=cfg.temperature, top_k=top_k, top_p=top_p, statistics=statistics,
            ).cpu()  # fmt: skip
            writer.write(labels_B.numpy(), noise_BLD.numpy(), tokens_BL.numpy())
            entropy_sum += float(statistics["entropy_B"].sum())
            nll_sum += float(statistics["nll_B"].sum())
            token_counts += np.bincount(tokens_BL.reshape(-1).numpy(), minlength=len(token_counts))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    seconds = time.perf_counter() - start_time
    tokens = cfg.count * seq_len
    metrics = {
        "count": cfg.count,
        "seq_len": seq_len,
        "code_dim": code_dim,
        "teacher_entropy_per_token": entropy_sum / tokens,
        "mapped_nll_per_token": nll_sum / tokens,
        "codes_used": int((token_counts > 0).sum()),
    }
    tracker.log_metrics({**metrics, "speed/pairs_per_s": cfg.count / seconds})
    tracker.set_tags(
        {"arpipe.distill.teacher": cfg.teacher, "arpipe.distill.teacher_fingerprint": meta["teacher_fingerprint"]}
    )
    print(
        f"{STAGE}: {cfg.count} pairs in {seconds:.1f} s ({cfg.count / seconds:.0f}/s); teacher entropy "
        f"{metrics['teacher_entropy_per_token']:.3f} vs mapped-token NLL {metrics['mapped_nll_per_token']:.3f} "
        f"nats/token; {metrics['codes_used']} codes used"
    )
    return metrics


def main() -> None:
    stage_main(STAGE, Config, run, is_main_process=process_state().is_main_process)


if __name__ == "__main__":
    main()
