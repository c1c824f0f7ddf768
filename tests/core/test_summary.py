"""The results summary (core/summary.py) in its other cases: champion kept, not registered, no evaluation."""

import json

from core.summary import results_summary

METRICS = {"train": {"real": {"fid": 3.5}}, "base": {"cfg1": {"fid": 3.4, "class_acc": 0.9}}}


def write(tmp_path, metrics, registry):
    (tmp_path / "evaluate.json").write_text(json.dumps(metrics))
    if registry is not None:
        (tmp_path / "registry.json").write_text(json.dumps(registry))
    return tmp_path / "evaluate.json", tmp_path / "registry.json"


def test_a_kept_champion_names_its_version_and_says_it_did_not_move(tmp_path):
    registry = {"best_checkpoint": "base", "select": "fid@cfg1", "best_value": 3.4, "registered": True,
                "model": "arpipe-gpt", "version": "5", "champion_moved": False, "champion_version": "2",
                "reason": "candidate 3.4 does not beat champion 3.1 (lower is better)"}  # fmt: skip
    text = results_summary(*write(tmp_path, METRICS, registry), "data/eval", "skipped")
    assert "| **base** | cfg1 | 3.400 | 3.500 | 0.900 | - | - |" in text
    assert "Champion: arpipe-gpt v2, did not move (candidate v5): candidate 3.4 does not beat" in text
    assert "evaluate was up to date" in text


def test_without_tracking_the_summary_says_nothing_was_registered(tmp_path):
    registry = {"best_checkpoint": "base", "registered": False, "why_not": "MLflow tracking is off"}
    text = results_summary(*write(tmp_path, METRICS, registry), "data/eval")
    assert "Champion: not registered (MLflow tracking is off)." in text


def test_no_evaluation_no_summary(tmp_path):
    assert results_summary(tmp_path / "missing.json", tmp_path / "r.json", "data/eval") == ""


def row(fid: float, lo: float, hi: float) -> dict:
    return {"fid": fid, "fid_lo": lo, "fid_hi": hi, "class_acc": 0.9}


NOISY = {
    "reconstruction": {"real": row(3.6, 3.2, 4.0)},
    "train": {"real": row(3.5, 3.1, 3.9)},
    "base": {"cfg1": row(3.19, 2.9, 3.5), "cfg3": row(3.0, 2.0, 4.0)},
    "cca": {"cfg1": row(3.15, 2.9, 3.4)},
    "ddo": {"cfg1": row(5.0, 4.7, 5.3)},
}
PICKED_CCA = {"best_checkpoint": "cca", "select": "fid@cfg1", "best_value": 3.15, "registered": False,
              "why_not": "MLflow tracking is off"}  # fmt: skip


def test_fids_show_their_interval_and_the_summary_says_which_are_within_noise_of_the_best(tmp_path):
    text = results_summary(*write(tmp_path, NOISY, PICKED_CCA), "data/eval")
    assert "| **cca** | cfg1 | 3.150 [2.90, 3.40] | 3.500 [3.10, 3.90] | 0.900 |" in text
    sentence = next(line for line in text.splitlines() if line.startswith("FID at cfg1 with 90% bootstrap intervals"))
    assert "cca 3.150 [2.90, 3.40] is the lowest; within noise of it: base 3.190 [2.90, 3.50]" in sentence
    assert "beyond noise: ddo 5.000 [4.70, 5.30]" in sentence
    # the noise verdict is read at the selection guidance only: base's lower cfg3 FID is not ranked
    assert "cfg3" not in sentence
    assert "cca is within noise of the real-data floor 3.500 [3.10, 3.90]" in sentence
    # reconstructions within noise of the floor: the tokenizer is not what limits these numbers
    assert "bottleneck" not in text


def test_a_checkpoint_apart_from_the_others_is_not_within_noise(tmp_path):
    metrics = {**NOISY, "cca": {"cfg1": row(2.0, 1.8, 2.2)}}
    text = results_summary(*write(tmp_path, metrics, PICKED_CCA), "data/eval")
    assert "cca 2.000 [1.80, 2.20] is the lowest; beyond noise: base 3.190 [2.90, 3.50], ddo 5.000" in text
    assert "within noise of it" not in text and "within noise of the real-data floor" not in text


def test_reconstructions_far_above_the_floor_flag_the_tokenizer_with_what_to_change(tmp_path):
    metrics = {**NOISY, "reconstruction": {"real": row(12.0, 11.0, 13.0)}}
    text = results_summary(*write(tmp_path, metrics, PICKED_CCA), "data/eval")
    [line] = [line for line in text.splitlines() if "bottleneck" in line]
    assert line.startswith(
        "The tokenizer is the bottleneck: its reconstructions score FID 12.000 [11.00, 13.00] vs the real-data "
        "floor 3.500 [3.10, 3.90] (3.4x; the aim is within 3x), so no AR model trained on its tokens can beat 12.000"
    )
    assert "`train_tokenizer.model.codebook_size`" in line and "`train_tokenizer.disc_weight`" in line


def test_a_best_checkpoint_that_reached_the_reconstructions_flags_the_tokenizer(tmp_path):
    """Reconstructions under 3x the floor but beyond its noise, and the best checkpoint within
    their noise: the AR model is done, the tokenizer caps it."""
    metrics = {
        "reconstruction": {"real": row(5.0, 4.6, 5.4)},
        "train": {"real": row(2.0, 1.8, 2.2)},
        "base": {"cfg1": row(5.3, 4.9, 5.7)},
    }
    registry = {**PICKED_CCA, "best_checkpoint": "base"}
    text = results_summary(*write(tmp_path, metrics, registry), "data/eval")
    assert "(2.5x, and base 5.300 [4.90, 5.70] at cfg1 is already within noise of them)" in text
    metrics["base"]["cfg1"] = row(7.0, 6.6, 7.4)  # beyond the reconstructions' noise: the model is the limit
    assert "bottleneck" not in results_summary(*write(tmp_path, metrics, registry), "data/eval")
