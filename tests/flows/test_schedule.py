"""Scheduled retraining: the pipeline as a cron-scheduled Prefect deployment; list and remove."""

import pytest
from helpers import REPO


@pytest.mark.slow
def test_register_lists_and_removes_a_cron_deployment(prefect_harness, tmp_path):
    from flows import schedule

    schedule.register("weekly", "0 3 * * 1", REPO, until="shard")
    schedule.register("weekly", "0 4 * * 1", REPO)  # same name: updated, not duplicated
    found = schedule.list_schedules()
    assert [(d["name"], d["cron"]) for d in found] == [("arpipe-pipeline/weekly", ["0 4 * * 1"])]
    schedule.remove("weekly")
    assert schedule.list_schedules() == []


def test_scheduled_runs_are_durable_unless_told_otherwise():
    from flows import schedule

    assert schedule.deployment("x", "0 3 * * 1", REPO).parameters["durable"] is True
    assert schedule.deployment("x", "0 3 * * 1", REPO, durable=False).parameters["durable"] is False


def test_a_bad_cron_expression_is_refused():
    from flows import schedule

    with pytest.raises(ValueError):
        schedule.deployment("x", "every monday", REPO)


def test_prefect_yaml_describes_the_same_flow_and_a_valid_schedule():
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    from flows import schedule

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = [
        d for d in spec["deployments"] if d["name"] == "retrain"
    ]  # the others: tests/flows/test_cluster.py
    assert deployment["parameters"]["durable"] is True  # scheduled runs commit and push their results
    path, name = deployment["entrypoint"].split(":")
    flow = load_flow_from_entrypoint(f"{REPO / path}:{name}")
    assert flow.name == "arpipe-pipeline"
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)
    schedule.deployment(deployment["name"], deployment["schedules"][0]["cron"], REPO)  # a valid cron
