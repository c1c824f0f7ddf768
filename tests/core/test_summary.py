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
