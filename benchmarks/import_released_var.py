"""Import cost and CPU sampling speed of VAR's released formats at official size, random weights.

    python benchmarks/import_released_var.py [--work /tmp/arpipe-released-var] [--no-sampling]

No released weights can be downloaded here, so the script first writes stand-ins of
``vae_ch160v4096z32.pth`` and ``var_d16.pth`` into ``--work`` (random values in the released key
names and shapes, ``models/released/var_layout.py``; ``torch.save`` like the authors' files). Then,
each in a fresh process so its peak RSS is its own:

- import: ``torch.load(weights_only=True)`` -> the converter (``models/released/var.py``) ->
  ``core.checkpoint.write_checkpoint`` (model.safetensors + config.json), timed per phase, with the
  process's peak RSS (``ru_maxrss``) and its RSS after imports (the interpreter and torch);
- sampling (VAR-d16: 10 scales, 680 tokens; ``top_k``/``top_p`` the family's 900 / 0.96): tokens
  for batch 1 and 16, guidance-free and with VAR's ramp at its FID cfg 1.5 (ramp 1 -> 2.5 here,
  which doubles the batch), after one untimed batch-1 run; and one image's decode (batch 1).

One run each (the machine is shared: expect ±20%). Torch runs on ``--threads`` (default 1).
Writes ``benchmarks/results/import_released_var.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VAE_FILE, VAR_FILE = "vae_ch160v4096z32.pth", "var_d16.pth"


def _rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def make(work: Path) -> None:
    import torch

    from models.released.var import PATCH_NUMS
    from models.released.var_layout import random_released, var_layout, vqvae_layout

    scales = PATCH_NUMS["256"]
    if not (work / VAE_FILE).is_file():
        torch.save(random_released(vqvae_layout(), scales), work / VAE_FILE)
    if not (work / VAR_FILE).is_file():
        torch.save(random_released(var_layout(depth=16), scales, seed=1), work / VAR_FILE)


def import_one(format_name: str, source: Path, out: Path, model: str | None, tokenizer_dir: Path | None) -> dict:
    import torch

    from core.checkpoint import write_checkpoint
    from models.released import converter

    baseline = _rss_gb()
    start = time.perf_counter()
    released = torch.load(source, map_location="cpu", weights_only=True)
    loaded = time.perf_counter()
    tokenizer = json.loads((tokenizer_dir / "config.json").read_text()) if tokenizer_dir else None
    converted = converter(format_name)(released, model=model, tokenizer=tokenizer)
    converted_at = time.perf_counter()
    write_checkpoint(out, converted.state_dict, {**converted.config, "source": source.name})
    written = time.perf_counter()
    return {
        "file_gb": source.stat().st_size / 1e9,
        "params_m": sum(v.numel() for k, v in converted.state_dict.items() if "usage" not in k) / 1e6,
        "load_s": loaded - start,
        "convert_s": converted_at - loaded,
        "write_s": written - converted_at,
        "total_s": written - start,
        "peak_rss_gb": _rss_gb(),
        "rss_after_imports_gb": baseline,
        "rebuilt": list(converted.rebuilt),
    }


def sample(tokenizer_dir: Path, model_dir: Path) -> dict:
    import torch

    from core.checkpoint import read_checkpoint
    from models.ar import ar_from_state, tokenizer_from_state
    from models.sampling import family_filters, guidance_per_step

    tokenizer = tokenizer_from_state(*read_checkpoint(tokenizer_dir))
    state, config = read_checkpoint(model_dir)
    model = ar_from_state(state, config, tokenizer)
    del state
    top_k, top_p = family_filters("auto", "auto", arch="var", vocab_size=model.config.vocab_size)

    def tokens(batch: int, guided: bool) -> tuple[torch.Tensor, float]:
        cfg_scale = guidance_per_step(2.5 if guided else 1.0, "auto", arch="var", steps=model.steps)
        labels = torch.arange(batch) * 37 % model.num_classes
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        out = model.generate(labels, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p, generator=generator)
        return out, time.perf_counter() - start

    tokens(1, False)  # warm-up
    rows = {}
    for batch in (1, 16):
        for guided in (False, True):
            _, seconds = tokens(batch, guided)
            rows[f"b{batch}_{'cfg_ramp' if guided else 'guidance_free'}"] = {
                "seconds": seconds,
                "images_per_s": batch / seconds,
                "tokens_per_s": batch * model.seq_len / seconds,
            }
            print(f"sampling: batch {batch}, {'ramp' if guided else 'no guidance'}: {seconds:.1f} s", file=sys.stderr)
    one, _ = tokens(1, False)
    start = time.perf_counter()
    with torch.no_grad():
        tokenizer.decode(one)
    rows["decode_b1_seconds"] = time.perf_counter() - start
    rows["peak_rss_gb"] = _rss_gb()
    rows["settings"] = {"steps": model.steps, "seq_len": model.seq_len, "top_k": top_k, "top_p": top_p,
                        "cfg_ramp": "VAR cfg 1.5 = linear_guidance_ramp(2.5, 10)"}  # fmt: skip
    return rows


def _child(threads: int, task: str, *args) -> dict:
    """Run ``task`` in a fresh interpreter (its own peak RSS); return its JSON result."""
    command = [sys.executable, __file__, "--threads", str(threads), "--child", json.dumps([task, *args])]
    done = subprocess.run(command,
                          check=True, stdout=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/arpipe-released-var", help="scratch folder for the stand-in files")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-sampling", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "import_released_var.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        task, *rest = json.loads(args.child)
        result = {"make": make, "import": import_one, "sample": sample}[task](
            *[Path(a) if isinstance(a, str) and a.startswith("/") else a for a in rest]
        )
        print(json.dumps(result or {}))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    _child(args.threads, "make", str(work))
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
        },  # fmt: skip
        "var-vqvae": _child(
            args.threads, "import", "var-vqvae", str(work / VAE_FILE), str(work / "var-tok"), None, None
        ),
        "var d16": _child(
            args.threads, "import", "var", str(work / VAR_FILE), str(work / "var-d16"), "d16", str(work / "var-tok")
        ),
    }
    if not args.no_sampling:
        results["sampling var d16"] = _child(args.threads, "sample", str(work / "var-tok"), str(work / "var-d16"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
