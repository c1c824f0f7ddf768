"""`arpipe plan`'s time table (arpipe/stage_work.py, arpipe/plan_time.py) and its CPU calibration
(benchmarks/stage_times.py): rows, scaling in images, the per-1,000 figure, a missing calibration."""

import json
import shutil

import pytest
from click.testing import CliRunner
from helpers import REPO

from arpipe.cli import cli
from arpipe.plan_time import (
    Calibration,
    CpuPeak,
    GpuAssumption,
    estimate,
    format_times,
    human_seconds,
    load_calibration,
)
from arpipe.stage_work import Images, model_costs, source_images, stage_works
from core.config import flatten_params, read_params

# the default params' stages that compute: sar passes a gpt through
STAGES = ["shard", "train_tokenizer", "cache_tokens", "pretrain", "cca", "ddo", "distill_pairs", "distill",
          "distill2", "train_evalnet", "evaluate"]  # fmt: skip
PEAK = 100e9  # a fixed CPU peak: no measuring, the same figures on every run


@pytest.fixture
def calibration_file(tmp_path):
    """A stage_times.json as benchmarks/stage_times.py writes it: every stage at half the peak."""
    stages = {stage: {"seconds": 10.0, "efficiency": 0.5} for stage in STAGES if stage != "shard"}
    stages["shard"] = {"seconds": 9.0, "images": 1797, "seconds_per_image": 0.005, "source": "digits images at 16 px"}
    figures = {"pipeline_run": {"id": "0" * 32, "start": "2026-12-07T14:10:21+00:00", "seconds": 1000.0},
               "images": {"train": 1611, "val": 186}, "peak_flops": PEAK, "stages": stages,
               "between_stages_seconds": 100.0}  # fmt: skip
    path = tmp_path / "stage_times.json"
    path.write_text(json.dumps({"name": "stage_times", "date": "2026-12-07T19:00:00+00:00", "figures": figures}))
    return path


@pytest.fixture(scope="module")
def defaults():
    params = read_params(REPO / "params.yaml")
    return params, model_costs(params, num_classes=10)


def table_for(defaults, images: Images, calibration: Calibration):
    params, costs = defaults
    return estimate(stage_works(params, costs, images, 10), images, calibration, PEAK, GpuAssumption())


def test_the_time_table_has_a_row_per_stage_and_a_total(calibration_file):
    args = ["plan", "--params", str(REPO / "params.yaml"), "--cpu-peak-gflops", "100", "--stage-times"]
    result = CliRunner().invoke(cli, [*args, str(calibration_file)])
    assert result.exit_code == 0, result.output
    rows = [line.split("|")[1].strip() for line in result.output.split("Estimated time for 1,797 images")[1]
            .splitlines() if line.startswith("| ") and "---" not in line][1:]  # fmt: skip
    assert rows == [*STAGES, "between stages", "total", "per 1,000 images", "each further 1,000 images"]
    assert "(the digits source; 1,617 train, 180 val)" in result.output
    assert "CPU (measured): per-stage efficiency from the" in result.output
    assert "GPU (assumed, not measured): one H100 SXM-class GPU at 989 TFLOP/s (dense bf16) x 35% MFU" in result.output


def test_doubling_the_images_doubles_the_per_image_and_epoch_stages_only(defaults, calibration_file):
    # 6,400 train rows: one cca epoch is 100 steps of 64, then exactly 200
    calibration = load_calibration(calibration_file)
    one, two = (table_for(defaults, Images(6400 * k, 700 * k), calibration) for k in (1, 2))
    cpu = [{r.stage: r.cpu_seconds for r in table.rows} for table in (one, two)]
    flops = [{r.stage: r.flops for r in table.rows} for table in (one, two)]
    assert cpu[1]["shard"] == pytest.approx(2 * cpu[0]["shard"])
    assert flops[1]["cache_tokens"] == pytest.approx(2 * flops[0]["cache_tokens"])
    for stage in ("cca", "ddo"):  # the sample grid at the end does not grow
        assert flops[1][stage] == pytest.approx(2 * flops[0][stage], rel=0.02)
        assert flops[1][stage] < 2 * flops[0][stage]
    for stage in ("distill_pairs", "distill", "distill2"):  # fixed steps, no image read
        assert flops[1][stage] == flops[0][stage]
    for stage in ("train_tokenizer", "pretrain", "train_evalnet"):  # fixed steps; only the val passes grow
        assert flops[0][stage] < flops[1][stage] < 1.05 * flops[0][stage]
    assert cpu[1]["between stages"] == cpu[0]["between stages"]


def test_per_thousand_images_is_the_total_over_the_images(defaults, calibration_file):
    images, calibration = Images(9000, 1000), load_calibration(calibration_file)
    table, more = (table_for(defaults, i, calibration) for i in (images, Images(9900, 1100)))
    assert table.per_thousand_images(table.cpu_seconds) == pytest.approx(table.cpu_seconds / 10_000 * 1000)
    text = format_times(table, more, calibration, CpuPeak(PEAK, 2, given=True), GpuAssumption())
    cpu, gpu = (human_seconds(seconds / images.total * 1000) for seconds in (table.cpu_seconds, table.gpu_seconds))
    assert f"| per 1,000 images | | | {cpu} | {gpu} |" in text.splitlines()
    total = next(line for line in text.splitlines() if line.startswith("| total |"))
    assert total.endswith(f"| {human_seconds(table.cpu_seconds)} | {human_seconds(table.gpu_seconds)} |")


def test_the_committed_calibration_covers_every_default_stage():
    calibration = load_calibration()
    assert calibration.problem == "" and calibration.peak_flops > 0
    assert set(calibration.efficiency) == set(STAGES) - {"shard"}
    assert all(0 < e < 1 for e in calibration.efficiency.values())  # never above the matmul peak


@pytest.mark.parametrize(
    "text, problem",
    [(None, "does not exist (run benchmarks/stage_times.py)"), ("{not json", "is malformed (JSONDecodeError"),
     ('{"figures": {}}', "is malformed (KeyError: 'stages')"), ("[1]", "is malformed (TypeError")],
)  # fmt: skip
def test_a_missing_or_malformed_calibration_gives_a_labelled_uncalibrated_estimate(tmp_path, text, problem):
    path = tmp_path / "stage_times.json"
    if text is not None:
        path.write_text(text)
    assert problem in load_calibration(path).problem
    result = CliRunner().invoke(cli, ["plan", "--stage-times", str(path), "--cpu-peak-gflops", "100"])
    assert result.exit_code == 0, result.output
    assert "UNCALIBRATED estimate for 1,797 images" in result.output
    assert f"CPU (UNCALIBRATED: {path} {problem}" in result.output
    assert "| between stages |" not in result.output  # not measured: not counted


def test_a_calibration_with_a_negative_efficiency_is_malformed(calibration_file):
    assert load_calibration(calibration_file).problem == ""
    record = json.loads(calibration_file.read_text())
    record["figures"]["stages"]["pretrain"]["efficiency"] = -0.5
    calibration_file.write_text(json.dumps(record))
    assert "not a positive number" in load_calibration(calibration_file).problem


def test_the_gpu_flags_replace_the_assumption_and_the_help_states_it():
    from arpipe.plan_time import GPU_MFU, GPU_PEAK_TFLOPS

    args = ["plan", "--cpu-peak-gflops", "100", "--gpu-peak-tflops", "100", "--gpu-mfu", "0.5"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "one H100 SXM-class GPU at 100 TFLOP/s (dense bf16) x 50% MFU" in result.output
    help_text = " ".join(CliRunner().invoke(cli, ["plan", "--help"]).output.split())  # unwrapped
    assert f"(default: {GPU_PEAK_TFLOPS:g}, one H100 SXM in bf16)" in help_text
    assert f"(default: {GPU_MFU:g})" in help_text and "GPU time, assumed" in help_text


def test_the_gpu_column_is_flops_over_the_assumed_rate_floored_by_launches():
    from arpipe.stage_work import StageWork, Work

    big = StageWork("pretrain", "", Work(flops=1e18, optimizer_steps=1000))
    assert GpuAssumption(1000, 0.5).seconds(big) == pytest.approx(2000)
    assert GpuAssumption(2000, 0.5).seconds(big) == pytest.approx(1000)
    tiny = StageWork("pretrain", "", Work(flops=1e9, optimizer_steps=1000, forward_passes=500))
    assert GpuAssumption().seconds(tiny) == pytest.approx(1000 * 0.010 + 500 * 0.001)


def test_the_image_count_comes_from_the_flag_the_digits_or_shards_of_the_same_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    params = read_params(REPO / "params.yaml")
    assert source_images(params, 500) == (500, "--images")
    assert source_images(params, None) == (1797, "the digits source")
    shards = tmp_path / "shards"
    shards.mkdir()
    params["paths"]["shards"] = str(shards)
    params["shard"].update(source="imagefolder", source_path=str(tmp_path / "photos"))
    assert source_images(params, None) == (None, f"{shards}/manifest.parquet does not exist yet")
    sources = [str(tmp_path / "photos" / "a" / f"{i}.jpg") for i in range(3)]
    pq.write_table(pa.table({"source": sources}), shards / "manifest.parquet")
    assert source_images(params, None) == (3, f"{shards}/manifest.parquet")
    pq.write_table(pa.table({"source": ["sklearn-digits:0000"]}), shards / "manifest.parquet")
    assert "holds shards of another source" in source_images(params, None)[1]


def test_stage_times_reads_a_pipeline_run_and_writes_each_stage_s_seconds(tmp_path, mlflow_template_db, monkeypatch):
    from mlflow import MlflowClient

    from benchmarks import stage_times
    from core.tracking import MlflowTracker

    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template_db, db)
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.create_experiment("arpipe")
    params = read_params(REPO / "params.yaml")
    params["pretrain"]["steps"] = 300  # what the run had, not what params.yaml has now
    start = 1_800_000_000_000  # ms
    pipeline = client.create_run(experiment, start_time=start, tags={"arpipe.stage": "pipeline"}).info.run_id
    MlflowTracker(client, pipeline).log_params(flatten_params(params))
    took = {"shard": 4.0, "train_tokenizer": 60.0, "cache_tokens": 2.0, "pretrain": 50.0, "sar": 1.5, "cca": 5.0}
    t = start
    for stage, seconds in took.items():
        run = client.create_run(experiment, start_time=t, tags={"arpipe.stage": stage, "mlflow.parentRunId": pipeline})
        client.set_tag(pipeline, f"arpipe.{stage}.run_id", run.info.run_id)
        client.set_tag(pipeline, f"arpipe.{stage}.status", "ran")
        if stage == "shard":
            counts = {"train/count": 1611, "val/count": 186, **{f"train/class_{i}": 160 for i in range(10)}}
            for key, value in counts.items():
                client.log_metric(run.info.run_id, key, value)
        t += int(seconds * 1000) + 1000  # a second between stages
        client.set_terminated(run.info.run_id, "FINISHED", end_time=t - 1000)
    client.set_terminated(pipeline, "FINISHED", end_time=t)
    monkeypatch.setenv("ARPIPE_BENCH_RESULTS", str(tmp_path / "results"))

    assert stage_times.main(["--project", str(REPO), "--store", str(db)]) == 0
    figures = json.loads((tmp_path / "results" / "stage_times.json").read_text())["figures"]
    assert {s: figures["stages"][s]["seconds"] for s in figures["stages"]} == {
        s: v for s, v in took.items() if s != "sar"
    }
    assert figures["passed_through"] == {"sar": 1.5}  # a gpt: sar computed nothing
    assert figures["between_stages_seconds"] == pytest.approx(len(took) + 1.5)
    assert figures["stages"]["shard"]["seconds_per_image"] == pytest.approx(4.0 / 1797)
    run_works = {w.stage: w for w in stage_works(params, model_costs(params, 10), Images(1611, 186), 10)}
    assert figures["stages"]["pretrain"]["flops"] == run_works["pretrain"].work.flops
    assert figures["peak_from"] == "measured now" and figures["images"] == {"train": 1611, "val": 186}
    assert sorted(figures["not_timed"]) == ["ddo", "distill", "distill2", "distill_pairs", "evaluate", "train_evalnet"]
