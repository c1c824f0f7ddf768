"""evaluate's report.md: the words and tables around the numbers ``stages/evaluate.py`` scores.

One side-by-side table per feature space (the bounds first, then each checkpoint at each guidance
scale, the distilled students at their step counts), the best checkpoint, the verdicts
(``core/verdicts.py``: which FIDs are within noise of the best, whether the tokenizer is the
bottleneck), one line per pass-through checkpoint not evaluated, and the distilled students against
their teacher. Pure text from evaluate's results (``<checkpoint>/<guidance>/<metric>``), its speed
record and its Config (read for the sampling settings and the selection; passed in, since core
imports no stages): no torch, no files, no timings in the text (report.md is a DVC out, byte-identical
across runs).
"""

from __future__ import annotations

from pathlib import Path

from core.verdicts import INTERVAL_LEVEL, fid_cell, verdicts

DISTILLED = "distilled"
DISTILLED2 = "distilled2"


def guidance_key(scale: float) -> str:
    return f"cfg{scale:g}"


def report_markdown(
    results: dict,
    names: list[str],
    cfg,
    best: str,
    evalnet_config: dict,
    inception_identity: str | None = None,
    skipped: dict | None = None,
    speed: dict | None = None,
) -> str:
    """One side-by-side table per feature space: bounds first, then each checkpoint at each guidance
    scale (the distilled student at 1 and 2 steps); then one line per pass-through checkpoint that
    was not evaluated and the student against its teacher."""
    lines = [
        "# arpipe evaluation",
        "",
        f"Reference set: the val split. Samples: {cfg.samples_per_class} per class, class-balanced, "
        f"seed {cfg.seed}, temperature {cfg.temperature}, top-k {cfg.top_k}, top-p {cfg.top_p}. "
        "`cfg1` is guidance-free. Each number is computed in the feature space named by its table.",
        "",
        "## Feature space: evalnet (proxy)",
        "",
        f"FID, precision and recall on the penultimate features of the `train_evalnet` classifier (val accuracy "
        f"{evalnet_config['val_accuracy']:.4f}), IS and class accuracy on its logits; "
        "a proxy space, so FID/IS here are not comparable with published ImageNet (Inception) numbers. "
        "Metric keys: `<checkpoint>/<guidance>/<metric>`."
        + (
            f" FID [lo, hi]: its {INTERVAL_LEVEL:.0%} bootstrap interval over the scored images ({cfg.fid_resamples} "
            "resamples, the val set held fixed; keys `fid_lo`, `fid_hi`): overlapping intervals are within noise."
            if cfg.fid_resamples
            else ""
        ),
        "",
        *_table(results, names, cfg, best, "", ("fid", "is", "precision", "recall", "class_acc")),
    ]
    if inception_identity is not None:
        lines += [
            "",
            "## Feature space: Inception (torch-fidelity InceptionV3)",
            "",
            "FID, precision and recall on the 2048-d pool features of torch-fidelity's InceptionV3 "
            f"(`inception-v3-compat`, weights {inception_identity}; images resized to 299×299 inside the network), "
            "IS on the softmax of its 1008 unbiased logits; no class accuracy (its classes are ImageNet's, not the "
            "dataset's). The reference is the val split (not ImageNet statistics) and the sample count is the one "
            "above, so these are not comparable with published ImageNet numbers either. "
            "Metric keys: `<checkpoint>/<guidance>/inception_<metric>`.",
            "",
            *_table(
                results,
                names,
                cfg,
                best,
                "inception_",
                ("fid", "is", "precision", "recall") + (("fid_ref",) if cfg.reference_batch else ()),
            ),
        ]
        if cfg.reference_batch:
            lines += [
                "",
                f"`FID vs ref`: against the reference batch `{Path(cfg.reference_batch).name}` (its mu/sigma, or its "
                "images through the same network): the papers' protocol, comparable with their tables only at their "
                "sample count (50,000) and resolution. Keys: `<checkpoint>/<guidance>/inception_fid_ref`.",
            ]
    lines += ["", f"Best by {cfg.select_metric} at {guidance_key(cfg.select_guidance)}: **{best}**.", ""]
    lines += [verdict + "\n" for verdict in verdicts(results, cfg.select_metric, guidance_key(cfg.select_guidance))]
    lines += [f"Not evaluated: `{name}`, {why}." for name, why in (skipped or {}).items()]
    lines += [""] if skipped else []
    student = (speed or {}).get(DISTILLED, {})
    if "1step_speedup" in student:
        # timings stay out of this file (a DVC out, byte-identical across runs): the measured
        # speed-ups are in paths.last_run/evaluate_speed.json and on the MLflow run
        lines += [
            "Distilled student against its teacher (same run, same labels). The measured speed-ups "
            "(images/s ratio at the sampling batch size; latency of one image's tokens at batch 1) are timings, "
            "so they are kept out of this file and out of git: `evaluate_speed.json` in `paths.last_run` "
            "(default `.arpipe/last_run/`; keys `distilled/<mode>_speedup`, "
            "`distilled/<mode>_latency_speedup`) and the MLflow run (`speed/distilled/*`).",
            "",
            "| sampling | FID / teacher's ↓ | sequential passes: teacher / student |",
            "|---|---|---|",
        ]
        for mode in results[DISTILLED]:  # the student's step counts, in its order
            steps = student[f"{mode}_steps_per_image"]
            ratio = results[DISTILLED][mode].get("fid_vs_teacher", float("nan"))
            passes = student[f"{mode}_step_reduction"] * steps
            lines.append(f"| {mode} | {ratio:.2f}x | {passes:g} / {steps} |")
        lines.append("")
    generator = (speed or {}).get(DISTILLED2, {})
    if "1step_speedup" in generator:
        row = results[DISTILLED2]["1step"]
        passes = generator["1step_step_reduction"]
        gap = row.get("gap_closed_vs_dd1")
        lines += [
            "DD2 one-step generator (`distilled2`) against the same teacher (speed-ups in "
            "`evaluate_speed.json` in `paths.last_run` and MLflow, `distilled2/1step_*`): "
            f"FID / teacher's {row.get('fid_vs_teacher', float('nan')):.2f}x, sequential passes {passes:g} / 1"
            + (f"; gap closed vs DD1's one step (FID_DD1 − FID_DD2) / (FID_DD1 − FID_teacher) = {gap:.2f}"
               if gap is not None else "; gap closed vs DD1: not available (DD1's one step not above its "
                                        "teacher's FID, or DD1 or the teacher not scored here)")
            + ".",
            "",
        ]  # fmt: skip
    return "\n".join(lines)


def _table(results: dict, names: list[str], cfg, best: str, prefix: str, metrics: tuple[str, ...]) -> list:
    titles = {
        "fid": "FID ↓",
        "is": "IS ↑",
        "precision": "precision ↑",
        "recall": "recall ↑",
        "class_acc": "class acc ↑",
        "fid_ref": "FID vs ref ↓",
    }
    label = {
        "reconstruction": "*train images through the tokenizer (ceiling)*",
        "train": "*real train images (floor)*",
    }
    lines = [
        "| checkpoint | guidance | " + " | ".join(titles[m] for m in metrics) + " |",
        "|" + "---|" * (2 + len(metrics)),
    ]
    rows = [("reconstruction", "real"), ("train", "real")] + [(n, g) for n in names for g in results[n]]
    for name, guidance in rows:
        values = results[name][guidance]
        shown = label.get(name, f"**{name}**" if name == best else name)
        cells = [fid_cell(values, prefix + m) if m == "fid" else f"{values[prefix + m]:.3f}" for m in metrics]
        lines.append(f"| {shown} | {guidance} | " + " | ".join(cells) + " |")
    return lines
