"""Import cost and CPU sampling speed of released LlamaGen models (random weights, official sizes).

Builds random-weight files in the released layouts of VQ-16 and GPT-B (key -> shape from
``tests/assets/released/llamagen_shapes.json``, the authors' constructors) under ``--work``,
saved as LlamaGen's scripts save them (``{"model": state_dict}``), then:

1. imports each with ``arpipe.released.import_released`` in a fresh process (so peak RSS is the import's
   alone): wall time and peak resident memory;
2. samples 256 tokens from the imported GPT-B at batch 1 and 16, guidance-free and with CFG
   (cfg_scale 2.0, which runs 2·batch rows), and decodes one image with the imported VQ-16: seconds
   and tokens/s, one thread.

    python benchmarks/import_released.py [--work /tmp/arpipe-import-bench] [--threads 1]

Prints the figures and writes ``benchmarks/results/import_released.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES = REPO_ROOT / "tests" / "assets" / "released" / "llamagen_shapes.json"
RESULTS = REPO_ROOT / "benchmarks" / "results" / "import_released.json"

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
start = time.perf_counter()
from arpipe.released import import_released
import_released({fmt!r}, {file!r}, {out!r}, model={model!r}, tokenizer_dir={tokenizer!r})
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def write_released(name: str, path: Path) -> float:
    """A random-weight file in the released layout of ``name``; returns its size in MB."""
    table = json.loads(SHAPES.read_text())[name]
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) * 0.02 for key, shape in table.items()}
    torch.save({"model": state}, path)
    return path.stat().st_size / 1e6


def import_in_child(fmt: str, file: Path, out: Path, model: str, tokenizer: Path | None, threads: int) -> dict:
    code = CHILD.format(root=str(REPO_ROOT), fmt=fmt, file=str(file), out=str(out), model=model,
                        tokenizer=str(tokenizer) if tokenizer else None)  # fmt: skip
    env = {"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process_seconds"] = time.perf_counter() - start  # + interpreter and torch start-up
    return figures


@torch.no_grad()
def sampling_speed(base: Path, tokenizer_dir: Path) -> dict:
    from core.checkpoint import read_checkpoint
    from models.ar import ar_from_state, tokenizer_from_state

    tok_state, tok_config = read_checkpoint(tokenizer_dir)
    state, config = read_checkpoint(base)
    tokenizer = tokenizer_from_state(tok_state, tok_config)
    model = ar_from_state(state, config, tokenizer)
    del state, tok_state
    rows = {}
    for batch in (1, 16):
        for cfg_scale in (1.0, 2.0):
            labels = torch.arange(batch) % model.num_classes
            generator = torch.Generator().manual_seed(0)
            start = time.perf_counter()
            tokens = model.generate(labels, cfg_scale=cfg_scale, generator=generator)
            seconds = time.perf_counter() - start
            rows[f"batch{batch}_cfg{cfg_scale:g}"] = {
                "seconds": seconds,
                "tokens_per_s": batch * model.steps / seconds,
                "rows_run": batch * (2 if cfg_scale != 1.0 else 1),
            }
            print(f"  GPT-B sample 256 tokens, batch {batch:>2}, cfg_scale {cfg_scale:g}: {seconds:7.1f} s "
                  f"({rows[f'batch{batch}_cfg{cfg_scale:g}']['tokens_per_s']:.0f} tokens/s)")  # fmt: skip
    start = time.perf_counter()
    tokenizer.decode(tokens[:1])
    rows["vq16_decode_1_image_seconds"] = time.perf_counter() - start
    print(f"  VQ-16 decode of one 256-px image: {rows['vq16_decode_1_image_seconds']:.1f} s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/arpipe-import-bench"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]  # other processes on the machine slow every figure
    vq_file, gpt_file = args.work / "vq_ds16_c2i.pt", args.work / "c2i_B_256.pt"
    tok_dir, base_dir = args.work / "lg-tok", args.work / "lg-base"
    sizes = {"VQ-16": write_released("VQ-16", vq_file), "GPT-B": write_released("GPT-B", gpt_file)}
    print(f"released files (random weights): VQ-16 {sizes['VQ-16']:.0f} MB, GPT-B {sizes['GPT-B']:.0f} MB")
    imports = {
        "VQ-16": import_in_child("llamagen-vq", vq_file, tok_dir, "VQ-16", None, args.threads),
        "GPT-B": import_in_child("llamagen-gpt", gpt_file, base_dir, "GPT-B", tok_dir, args.threads),
    }
    for name, figures in imports.items():
        print(f"  import {name}: {figures['seconds']:.1f} s ({figures['process_seconds']:.1f} s with start-up), "
              f"peak RSS {figures['peak_rss_mb']:.0f} MB, file {sizes[name]:.0f} MB")  # fmt: skip
    sampling = sampling_speed(base_dir, tok_dir)
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "cores": os.cpu_count(),
            "load_average_1min_start_end": [load_start, os.getloadavg()[0]],
        },
        "file_mb": sizes,
        "import": imports,
        "sampling_gpt_b_256_tokens": sampling,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
