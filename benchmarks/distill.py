"""Distilled Decoding against its teacher: FID, class accuracy, images/s and speed-up.

For each project folder given (default: this repository) that holds the outputs of ``distill``
(``data/models/distilled``), its teacher (named in the student's config.json), the tokenizer, the
evalnet and the shards, samples ``--samples-per-class`` images per class (class-balanced, the same
labels and seeds for all three) from

- the teacher, KV-cached, at the guidance baked into the pairs (one forward pass per AR step),
- the student in 1 step and in 2 steps (the second re-noised with the same noise),

and scores them with the ``evaluate`` stage's metric code (``stages/evaluate.py`` ``score``:
FID, IS, precision/recall and class accuracy in the evalnet's feature space, against val).
Sampling is timed after a warm-up batch, in one process: in throughput (``--batch-size`` images
per batch, decode included), in latency (one image at a time, 100 images, decode included) and in
token latency (one image's tokens at a time, decode excluded: the decoder is shared, so this is
the part distillation changes). Prints a table per
project and the DD1 papers' bar (posttrain.md §4(e)): 1-step FID ≤ 2.5× the teacher's, 2-step
≤ 1.9×, speed-up ≥ 0.6 × the teacher's sequential steps (per student step).

Run one project per family, e.g. a scratch copy with ``pretrain.arch: var``::

    .venv/bin/python benchmarks/distill.py                       # this checkout's outputs
    .venv/bin/python benchmarks/distill.py --project /tmp/gpt-proj --project /tmp/var-proj
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/distill.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks._results import write_results  # noqa: E402

BAR = {"1step": 2.5, "2step": 1.9}  # FID at most this times the teacher's
SPEEDUP_SHARE = 0.6  # speed-up at least this share of the ideal (teacher steps / student steps)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(project: Path, samples_per_class: int | None, batch_size: int, latency_images: int = 100) -> dict | str:
    from core.checkpoint import read_checkpoint, teacher_cfg_scale
    from core.config import load_paths, load_section, read_params
    from core.shards import load_split
    from models.ar import ar_from_state, sample_images, tokenizer_from_state
    from models.dd_student import sample_distilled_images, student_from_state, token_latency_ms
    from models.evalnet import embed_images
    from stages import evaluate

    params = read_params(project / "params.yaml")
    paths = load_paths(params)
    paths = dataclasses.replace(
        paths, **{f.name: str(project / getattr(paths, f.name)) for f in dataclasses.fields(paths)}
    )
    student_dir = Path(paths.models) / "distilled"
    if not (student_dir / "config.json").is_file():
        return f"skipped: no {student_dir} (run the pipeline through `distill` first)"
    cfg = load_section(params, "evaluate", evaluate.Config)
    if samples_per_class:
        cfg = dataclasses.replace(cfg, samples_per_class=samples_per_class)
    torch.use_deterministic_algorithms(True)
    tokenizer = tokenizer_from_state(*read_checkpoint(paths.tokenizer))
    student_state, student_config = read_checkpoint(student_dir)
    student = student_from_state(student_state, student_config, tokenizer)
    teacher_info = student_config["teacher"]
    teacher_scale = teacher_cfg_scale(teacher_info)
    teacher = ar_from_state(*read_checkpoint(Path(paths.models) / teacher_info["name"]), tokenizer)
    evalnet, _ = evaluate.load_evalnet(paths.evalnet)
    real_feats, _ = embed_images(evalnet, load_split(paths.shards, "val").images_NHWC)
    classes = teacher.num_classes
    order = torch.randperm(classes * cfg.samples_per_class, generator=torch.Generator().manual_seed(cfg.seed))
    labels_N = torch.arange(classes).repeat_interleave(cfg.samples_per_class)[order]

    samplers = {
        "teacher": (teacher.steps, lambda labels: sample_images(
            teacher, tokenizer, labels, cfg_scale=teacher_scale, seed=cfg.seed, batch_size=batch_size)),
        "1step": (1, lambda labels: sample_distilled_images(
            student, tokenizer, labels, steps=1, seed=cfg.seed, batch_size=batch_size)),
        "2step": (2, lambda labels: sample_distilled_images(
            student, tokenizer, labels, steps=2, seed=cfg.seed, batch_size=batch_size)),
    }  # fmt: skip
    rows = {}
    for name, (passes, sample) in samplers.items():
        sample(labels_N[: min(batch_size, len(labels_N))])  # warm-up
        images, seconds = timed(lambda sample=sample: sample(labels_N).numpy())
        feats, logits = embed_images(evalnet, images)
        scores = evaluate.score(feats, logits, labels_N.numpy(), real_feats, cfg)
        single = labels_N[:latency_images]
        sample(single[:1])
        _, latency = timed(lambda sample=sample, single=single: [sample(single[i : i + 1]) for i in range(len(single))])
        model, steps = (teacher, None) if name == "teacher" else (student, passes)
        token_ms = token_latency_ms(model, single, steps=steps, cfg_scale=teacher_scale, seed=cfg.seed)
        rows[name] = {"passes": passes, "images_per_s": len(images) / seconds,
                      "ms_per_image_b1": 1e3 * latency / len(single), "token_ms_b1": token_ms, **scores}  # fmt: skip
    for name in ("1step", "2step"):
        rows[name]["fid_ratio"] = rows[name]["fid"] / rows["teacher"]["fid"]
        rows[name]["speedup"] = rows[name]["images_per_s"] / rows["teacher"]["images_per_s"]
        rows[name]["latency_speedup"] = rows["teacher"]["ms_per_image_b1"] / rows[name]["ms_per_image_b1"]
        rows[name]["token_latency_speedup"] = rows["teacher"]["token_ms_b1"] / rows[name]["token_ms_b1"]
    return {"arch": student_config["arch"], "teacher": teacher_info, "rows": rows, "cfg": cfg, "N": len(labels_N)}


def verdict(met: bool) -> str:
    return "met" if met else "not met"


def report(project: Path, result: dict) -> None:
    from core.checkpoint import teacher_cfg_scale

    rows, teacher_steps = result["rows"], result["rows"]["teacher"]["passes"]
    print(
        f"\n{project}: {result['arch']}, teacher {result['teacher']['name']} "
        f"(cfg_scale {teacher_cfg_scale(result['teacher']):g}, "
        f"{teacher_steps} steps), {result['N']} samples per sampler, {torch.get_num_threads()} threads"
    )
    print(f"{'sampler':<10} {'passes':>6} {'FID':>8} {'FID/teacher':>11} {'IS':>6} {'class acc':>9} "
          f"{'images/s':>10} {'speed-up':>8} {'ms/image b1':>11} {'speed-up b1':>11} "
          f"{'token ms b1':>11} {'speed-up':>8}")  # fmt: skip
    for name, row in rows.items():
        ratio = f"{row['fid_ratio']:.2f}x" if "fid_ratio" in row else "-"
        speedup = f"{row['speedup']:.1f}x" if "speedup" in row else "-"
        latency = f"{row['latency_speedup']:.1f}x" if "latency_speedup" in row else "-"
        tokens = f"{row['token_latency_speedup']:.1f}x" if "token_latency_speedup" in row else "-"
        print(f"{name:<10} {row['passes']:>6} {row['fid']:>8.3f} {ratio:>11} {row['is']:>6.2f} "
              f"{row['class_acc']:>9.3f} {row['images_per_s']:>10,.0f} {speedup:>8} "
              f"{row['ms_per_image_b1']:>11.2f} {latency:>11} {row['token_ms_b1']:>11.2f} {tokens:>8}")  # fmt: skip
    print("papers' bar (posttrain.md §4(e)):")
    for name, limit in BAR.items():
        row = rows[name]
        need = SPEEDUP_SHARE * teacher_steps / row["passes"]
        print(
            f"  {name}: FID {row['fid_ratio']:.2f}x the teacher's (bar ≤ {limit}x: "
            f"{'met' if row['fid_ratio'] <= limit else 'not met'}); speed-up {row['speedup']:.1f}x "
            f"(bar ≥ {need:.1f}x = {SPEEDUP_SHARE} × {teacher_steps}/{row['passes']} steps: "
            f"{'met' if row['speedup'] >= need else 'not met'}; one image at a time "
            f"{row['latency_speedup']:.1f}x: {'met' if row['latency_speedup'] >= need else 'not met'}; its tokens "
            f"alone {row['token_latency_speedup']:.1f}x: {verdict(row['token_latency_speedup'] >= need)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", action="append", type=Path, help="project folder (repeatable); default: repo")
    parser.add_argument("--samples-per-class", type=int, default=None, help="override evaluate.samples_per_class")
    parser.add_argument("--batch-size", type=int, default=250, help="images per sampling batch")
    args = parser.parse_args()
    figures = {"config": {"samples_per_class": args.samples_per_class, "batch_size": args.batch_size,
                          "threads": torch.get_num_threads(), "bar_fid_ratio": BAR, "speedup_share": SPEEDUP_SHARE},
               "projects": {}}  # fmt: skip
    for project in args.project or [REPO_ROOT]:
        result = measure(project.resolve(), args.samples_per_class, args.batch_size)
        if isinstance(result, str):
            print(f"\n{project}: {result}")
        else:
            report(project, result)
        figures["projects"][str(project)] = result  # a string says why it was skipped
    write_results("distill", figures)


if __name__ == "__main__":
    main()
