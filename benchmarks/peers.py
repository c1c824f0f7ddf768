"""arpipe against the authors' code, side by side: training step, MFU and sampling images/s.

The configuration of ``../shared/reference/performance.md`` (fp32, CPU, batch 64), built both ways:

- ``gpt``: arpipe's ``GPT`` as ``benchmarks/train_step.py`` builds it (8 layers x 256, 8 heads,
  vocab 512, 64 tokens, 10 classes) against LlamaGen's ``Transformer(ModelArgs(dim=256,
  n_layer=8, n_head=8, vocab_size=512, num_classes=10, block_size=64))`` (its default dropouts);
  training ``model(idx=tokens[:, :-1], cond_idx=labels, targets=tokens)``; sampling its
  ``generate(model, labels, 64, cfg_scale=2.0)`` against ``GPT.generate(labels, cfg_scale=2.0)``.
- ``var``: arpipe's ``VAR`` as train_step.py builds it (depth 6 x 256, 4 heads, vocab 512, scales
  1,2,3,4,6,8 = 130 tokens) against VAR's ``VAR(vae, depth=6, embed_dim=256, num_heads=4,
  patch_nums=(1,2,3,4,6,8), drop_path_rate=0.025)`` (its training script's 0.1·depth/24, as arpipe's
  default) with a narrow VQVAE backbone (only its quantizer is used: the
  teacher-forcing input for training, the next-scale input for sampling); sampling its
  ``autoregressive_infer_cfg(B, labels, cfg=1.5)`` against ``VAR.generate(labels,
  cfg_scale=linear_guidance_ramp(2.5, 6))`` (the same ramp in arpipe's convention), tokens only (the
  authors' final decode is replaced by a no-op on their VQVAE instance, in the child process).

Both sides: uniformly random tokens and labels, fp32 cross-entropy, backward, clip at 1.0, AdamW
(lr 1e-3, decay 0.05 on matrices); ``--steps`` timed after ``--warmup``, median; temperature 1,
no top-k/top-p; 64 images per sampling call, the median of ``--sample-repeats`` after a warm-up.
MFU = arpipe's ``flops_per_token() * batch * tokens`` (the same model FLOPs on both sides) /
median step / the fp32 matmul peak measured in that child (the higher of before and after).
``--compile`` compiles both sides (``torch.compile``, inductor): the training forward; for sampling,
arpipe's ``generate(compiled=True)`` (a static KV cache for the GPT, a graph per scale for VAR)
against LlamaGen's whole model compiled as its ``sample_c2i.py --compile`` does (VAR's sampler has
no compile path: eager). The authors' eager step is timed in the same rounds, so the file
(``peers_compiled``) also holds arpipe compiled / authors eager.

Every measurement runs in its own child process (the authors' VAR package is called ``models``
like ours), importing the authors' modules read-only from the given checkouts, nothing copied;
arpipe and the authors alternate, back to back, ``--repeats`` times, and each figure is the
median over repeats. The machines drift by +-20% within minutes: only the ratios mean something.
Without ``--llamagen`` / ``--var`` (or with a folder that lacks the modules) that family is
skipped with a message.

    python benchmarks/peers.py --llamagen /tmp/LlamaGen --var /tmp/VAR --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/peers.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._results import write_results  # noqa: E402

NEEDS = {"llamagen": ("autoregressive/models/gpt.py", "autoregressive/models/generate.py"),
         "var": ("models/var.py", "models/vqvae.py", "models/quant.py")}  # fmt: skip
FAMILY_OF = {"llamagen": "gpt", "var": "var"}
VOCAB, CLASSES, SCALES, SEED = 512, 10, (1, 2, 3, 4, 6, 8), 1234
GUIDANCE = {"gpt": 2.0, "var": 1.5}
RESULT = "PEER_RESULT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llamagen", type=Path, help="FoundationVision/LlamaGen checkout")
    parser.add_argument("--var", type=Path, help="FoundationVision/VAR checkout")
    parser.add_argument("--steps", type=int, default=15, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--batch", type=int, default=64, help="training batch")
    parser.add_argument("--sample-batch", type=int, default=64, help="images per sampling call")
    parser.add_argument("--sample-repeats", type=int, default=3, help="timed sampling calls (median)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating arpipe/authors rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every child")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both sides (training forward, sampling steps); the authors' eager step "
                        "is timed in the same rounds too (results: peers_compiled)")  # fmt: skip
    parser.add_argument("--child", choices=("arpipe-gpt", "arpipe-var", "llamagen", "var"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- children: one side, one family ----------------------------------------------------------------


def _timed_steps(step, count: int) -> list[float]:
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return seconds


def _adamw(model, torch):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                             lr=1e-3, betas=(0.9, 0.95))  # fmt: skip


def _authors_llamagen(checkout: Path):
    """LlamaGen's Transformer and generate, imported read-only; gpt.py's ``utils.drop_path`` import
    is stubbed (drop_path_rate 0), as in benchmarks/parity_released.py."""
    import importlib.util
    import types

    from torch import nn

    utils, drop_path = types.ModuleType("utils"), types.ModuleType("utils.drop_path")
    drop_path.DropPath = nn.Identity
    utils.drop_path = drop_path
    sys.modules.update({"utils": utils, "utils.drop_path": drop_path})
    modules = []
    for name in NEEDS["llamagen"]:
        spec = importlib.util.spec_from_file_location(f"llamagen_{Path(name).stem}", checkout / name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return modules


def _authors_var(checkout: Path, torch):
    """VAR's package from its checkout (its ``dist`` module stubbed, as in parity_released_var.py)."""
    import types

    sys.path.insert(0, str(checkout))
    for name in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
        del sys.modules[name]  # ours, imported through benchmarks._results: theirs is wanted here
    dist = types.ModuleType("dist")
    dist.get_device = lambda: torch.device("cpu")
    dist.initialized = lambda: False
    sys.modules["dist"] = dist
    from models.basic_vae import Decoder, Encoder
    from models.var import VAR
    from models.vqvae import VQVAE

    vae = VQVAE(vocab_size=VOCAB, z_channels=16, ch=32, test_mode=True, share_quant_resi=4, v_patch_nums=SCALES)
    backbone = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, dropout=0.0, z_channels=16, using_sa=False,
                    using_mid_sa=False)  # fmt: skip
    vae.encoder, vae.decoder = Encoder(double_z=False, **backbone), Decoder(**backbone)
    vae.fhat_to_img = lambda f_hat: f_hat.new_zeros(f_hat.shape[0], 3, 1, 1)  # tokens only: no final decode
    # stochastic depth as VAR's build_vae_var sets it (0.1·depth/24), which is arpipe's default too
    model = VAR(vae_local=vae, num_classes=CLASSES, depth=6, embed_dim=256, num_heads=4, patch_nums=SCALES,
                drop_path_rate=0.1 * 6 / 24, flash_if_available=False, fused_if_available=False)  # fmt: skip
    model.init_weights()
    return model, vae


def child(args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    from core.training import matmul_peak_flops

    family = "gpt" if args.child in ("arpipe-gpt", "llamagen") else "var"
    L = 64 if family == "gpt" else sum(s * s for s in SCALES)
    generator = torch.Generator().manual_seed(SEED)
    tokens_BL = torch.randint(VOCAB, (args.batch, L), generator=generator)
    labels_B = torch.randint(CLASSES, (args.batch,), generator=generator)
    sample_labels = torch.arange(args.sample_batch) % CLASSES
    flops = None
    if args.child.startswith("arpipe"):
        from benchmarks.train_step import build_model
        from models.sampling import linear_guidance_ramp

        model = build_model(family, torch.device("cpu"))
        flops = model.flops_per_token() * args.batch * L
        forward = torch.compile(model) if args.compile else model

        def loss_fn():
            return F.cross_entropy(forward(tokens_BL, labels_B).float().flatten(0, 1), tokens_BL.flatten())

        cfg_scale = GUIDANCE["gpt"] if family == "gpt" else linear_guidance_ramp(1 + GUIDANCE["var"], len(SCALES))

        def sample(labels=sample_labels):
            model.generate(labels, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(SEED),
                           compiled=args.compile)  # fmt: skip

    elif args.child == "llamagen":
        gpt, generate = _authors_llamagen(args.llamagen)
        model = gpt.Transformer(gpt.ModelArgs(dim=256, n_layer=8, n_head=8, vocab_size=VOCAB, num_classes=CLASSES,
                                              block_size=L, cls_token_num=1, model_type="c2i"))  # fmt: skip
        forward = torch.compile(model) if args.compile else model

        def loss_fn():
            return forward(idx=tokens_BL[:, :-1], cond_idx=labels_B, targets=tokens_BL)[1]

        def sample(labels=sample_labels):
            # compiled: the whole model, as LlamaGen's sample_c2i.py --compile does (its KV cache is static)
            generate.generate(forward, labels, L, cfg_scale=GUIDANCE["gpt"], temperature=1.0, top_k=0,
                              top_p=1.0)  # fmt: skip

    else:
        model, vae = _authors_var(args.var, torch)
        forward = torch.compile(model) if args.compile else model
        per_scale = list(tokens_BL.split([s * s for s in SCALES], dim=1))
        inputs = vae.quantize.idxBl_to_var_input(per_scale)

        def loss_fn():
            return F.cross_entropy(forward(labels_B, inputs).float().flatten(0, 1), tokens_BL.flatten())

        def sample(labels=sample_labels):
            model.autoregressive_infer_cfg(len(labels), labels, g_seed=SEED, cfg=GUIDANCE["var"],
                                           top_k=0, top_p=0.0)  # fmt: skip

    optimizer = _adamw(model, torch)

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    peak_before = matmul_peak_flops(torch.device("cpu"))
    model.train()
    warm = _timed_steps(step, args.warmup)
    seconds = _timed_steps(step, args.steps)
    peak = max(peak_before, matmul_peak_flops(torch.device("cpu")))
    model.eval()
    with torch.no_grad():
        sample()  # warm-up
        sample_seconds = _timed_steps(sample, args.sample_repeats)
        one_label = sample_labels[:1]
        sample(one_label)  # warm-up (compiled: the batch-1 graphs)
        latency_seconds = _timed_steps(lambda: sample(one_label), args.sample_repeats)
    params = sum(p.numel() for p in model.parameters())
    return {"side": args.child, "family": family, "params": params, "tokens": L, "step_seconds": seconds,
            "warmup_seconds": warm, "step_median": statistics.median(seconds), "peak_flops": peak,
            "step_flops": flops, "sample_seconds": sample_seconds,
            "images_per_s": args.sample_batch / statistics.median(sample_seconds),
            "latency_seconds": latency_seconds, "batch1_latency_s": statistics.median(latency_seconds)}  # fmt: skip


# -- parent ----------------------------------------------------------------------------------------


def run_child(side: str, args, compile_: bool) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--sample-batch", str(args.sample_batch),
               "--sample-repeats", str(args.sample_repeats), "--threads", str(args.threads),
               *(["--compile"] if compile_ else [])]  # fmt: skip
    for name in ("llamagen", "var"):
        if getattr(args, name):
            command += [f"--{name}", str(getattr(args, name).resolve())]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    found = [line for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if result.returncode or not found:
        raise SystemExit(f"{side}: the child failed:\n{result.stderr[-3000:]}")
    return json.loads(found[-1].removeprefix(RESULT))


def missing(name: str, folder: Path | None) -> str | None:
    if folder is None:
        return f"--{name} not given"
    absent = [p for p in NEEDS[name] if not (folder / p).is_file()]
    return f"{folder} lacks {', '.join(absent)}" if absent else None


def summarise(runs: list[dict], flops: float) -> dict:
    step = statistics.median(r["step_median"] for r in runs)
    peak = statistics.median(r["peak_flops"] for r in runs)
    return {"step_seconds": step, "mfu": flops / step / peak, "peak_flops": peak, "params": runs[0]["params"],
            "images_per_s": statistics.median(r["images_per_s"] for r in runs),
            "batch1_latency_s": statistics.median(r["batch1_latency_s"] for r in runs), "runs": runs}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(RESULT + json.dumps(child(args)), flush=True)
        return 0
    peers = {}
    for name in ("llamagen", "var"):
        why = missing(name, getattr(args, name))
        if why:
            repo = "LlamaGen" if name == "llamagen" else "VAR"
            print(f"{FAMILY_OF[name]}: skipped ({why}); a local checkout of the authors' code is needed: "
                  f"git clone https://github.com/FoundationVision/{repo}")  # fmt: skip
        else:
            peers[name] = FAMILY_OF[name]
    if not peers:
        print("nothing to compare: pass --llamagen DIR and/or --var DIR (local checkouts of the authors' repos)")
        return 0
    mode = "compiled" if args.compile else "eager"
    print(f"peers: batch {args.batch}, {args.steps} steps after {args.warmup}, {args.threads} threads, {mode}; "
          f"sampling {args.sample_batch} images; {args.repeats} alternating round(s)", flush=True)  # fmt: skip
    sides = [("arpipe", args.compile), ("authors", args.compile)] + [("authors_eager", False)] * args.compile
    collected = {name: {key: [] for key, _ in sides} for name in peers}
    for round_index in range(args.repeats):
        for name, family in peers.items():
            for key, compile_ in sides:
                side = f"arpipe-{family}" if key == "arpipe" else name
                print(f"round {round_index + 1}: {side}{' (compiled)' if compile_ else ''} ...", flush=True)
                collected[name][key].append(run_child(side, args, compile_))
    figures = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "families": {}}
    print()
    print(f"{'family':<7} {'side':<9} {'params':>7} {'step s':>7} {'MFU':>6} {'images/s':>9} {'batch-1 s':>9} "
          f"{'step ratio':>10} {'sampling ratio':>14} {'latency ratio':>13}")  # fmt: skip
    for name, family in peers.items():
        flops = collected[name]["arpipe"][0]["step_flops"]
        ours, theirs = (summarise(collected[name][k], flops) for k in ("arpipe", "authors"))
        step_ratio = ours["step_seconds"] / theirs["step_seconds"]
        sample_ratio = ours["images_per_s"] / theirs["images_per_s"]
        latency_ratio = ours["batch1_latency_s"] / theirs["batch1_latency_s"]
        for side, row in (("arpipe", ours), (name, theirs)):
            ratios = f"{step_ratio:>9.2f}x {sample_ratio:>13.2f}x {latency_ratio:>12.2f}x" if side == "arpipe" else ""
            print(f"{family:<7} {side:<9} {row['params'] / 1e6:>6.2f}M {row['step_seconds']:>7.3f} {row['mfu']:>6.1%} "
                  f"{row['images_per_s']:>9.1f} {row['batch1_latency_s']:>9.3f} {ratios}")  # fmt: skip
        figures["families"][family] = {"authors": name, "arpipe": ours, name: theirs, "step_ratio": step_ratio,
                                       "sampling_ratio": sample_ratio, "latency_ratio": latency_ratio}  # fmt: skip
        if args.compile:
            eager = summarise(collected[name]["authors_eager"], flops)
            vs_eager = ours["step_seconds"] / eager["step_seconds"]
            print(f"{family:<7} {name + ' eager':<9} {eager['params'] / 1e6:>6.2f}M {eager['step_seconds']:>7.3f} "
                  f"{eager['mfu']:>6.1%} {'':>9} arpipe compiled / this: {vs_eager:.2f}x")  # fmt: skip
            figures["families"][family].update({f"{name}_eager": eager, "step_ratio_vs_authors_eager": vs_eager})
    print(
        "\nstep ratio = arpipe step / authors' step, same mode (goals: <= 0.8 of the authors' eager step, <= 1.0 of "
        "their compiled one); sampling ratio = arpipe images/s / authors' (goal >= 1.5); latency ratio = arpipe's "
        "batch-1 seconds / authors' (lower is better)"
    )
    name = "peers_compiled" if args.compile else "peers"
    write_results(name, figures, argv=None if argv is None else ["benchmarks/peers.py", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
