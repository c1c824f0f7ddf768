"""benchmarks/gpu_check.py --tiny on the CPU (same code paths as on a GPU, tiny sizes) and the
results file every benchmark writes through benchmarks/_results.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
ROWS = ("train eager", "train compiled", "fsdp smoke", "sample b4", "sample b8", "sample b4 compiled")


def test_results_file_holds_figures_and_provenance(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO))
    from benchmarks._results import write_results

    monkeypatch.setenv("ARPIPE_BENCH_RESULTS", str(tmp_path))
    out = write_results("demo", {"rate": 1.5, "bad": math.nan, "rows": [(1, 2)]}, peaks={"cpu_fp32": 1e11},
                        argv=["benchmarks/demo.py", "--fast"])  # fmt: skip
    record = json.loads(out.read_text())
    assert out == tmp_path / "demo.json"
    assert record["figures"] == {"rate": 1.5, "bad": "nan", "rows": [[1, 2]]}
    assert record["command"].endswith("benchmarks/demo.py --fast")
    assert len(record["git"]["commit"]) == 40 and record["peak_flops"] == {"cpu_fp32": 1e11}
    machine = record["machine"]
    assert machine["cpu"] and machine["torch_threads"] >= 1 and len(machine["load_average_end"]) == 3
    assert record["date"].endswith("+00:00")


@pytest.mark.slow  # ~90-120 s on a loaded 2-core CPU: two accelerate launches and two aot_eager compiles
def test_tiny_gpu_check_runs_every_row_on_cpu_and_writes_its_table(tmp_path):
    env = {**os.environ, "ARPIPE_BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "every row ran" in out
    table = out[out.index("family  row") :]
    for family in ("gpt", "var"):
        for row in ROWS:
            assert any(line.startswith(family) and row in line for line in table.splitlines()), (family, row)
    record = json.loads((tmp_path / "gpu_check_tiny.json").read_text())
    assert record["name"] == "gpu_check_tiny" and record["figures"]["failed"] == []
    assert {"cpu_fp32", "cpu_fp32_check"} <= set(record["peak_flops"])
    rows = record["figures"]["rows"]
    assert len(rows) == 12 and all(r["ok"] for r in rows)
    trains = [r for r in rows if r["what"].startswith("train")]
    assert all(r["seconds"] > 0 and 0 < r["mfu"] for r in trains)
    assert all(r["images_per_s"] > 0 for r in rows if r["what"].startswith("sample"))


def test_peers_without_checkouts_skips_with_a_message(tmp_path):
    """benchmarks/peers.py needs local checkouts of the authors' repos; without them it says so."""
    env = {**os.environ, "ARPIPE_BENCH_RESULTS": str(tmp_path)}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "peers.py"), "--var", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "gpt: skipped (--llamagen not given)" in result.stdout
    assert f"var: skipped ({tmp_path} lacks models/var.py" in result.stdout
    assert "nothing to compare" in result.stdout and not list(tmp_path.glob("*.json"))


def test_cost_growth_refuses_a_folder_too_small_before_running_anything(tmp_path):
    """benchmarks/cost_growth.py links the first N/classes images of each class: a class with fewer
    fails at once, naming the class and the count, before any stage runs."""
    for name, count in (("coat", 5), ("shirt", 2)):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(count):
            (tmp_path / "src" / name / f"{i}.png").write_bytes(b"")
    command = [sys.executable, str(REPO / "benchmarks" / "cost_growth.py"), "--source", str(tmp_path / "src"),
               "--images", "8", "--tokens", "", "--work", str(tmp_path / "work")]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "class shirt has 2 images, 4 needed" in result.stderr
    assert not (tmp_path / "work" / "v0").exists()
    unknown = subprocess.run([*command[:2], "--source", str(tmp_path / "src"), "--tokens", "32"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert unknown.returncode == 2 and "--tokens 32: known variants are [64]" in unknown.stderr
