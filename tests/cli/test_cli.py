"""The `arpipe` command line: help for every command, data stats, clear errors."""

import pytest
from click.testing import CliRunner
from helpers import REPO, write_token_cache

from arpipe.cli import cli


def all_commands(group=cli, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from all_commands(command, (*prefix, name))


@pytest.mark.parametrize("command", [(), *all_commands()], ids=lambda c: " ".join(c) or "arpipe")
def test_every_command_explains_itself(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: arpipe" in result.output
    body = result.output.split("Options:")[0]
    assert len(body.split("\n", 2)[-1].strip()) > 20, "no description"


def test_top_level_help_lists_the_commands():
    output = CliRunner().invoke(cli, ["--help"]).output
    for name in ("run", "ui", "data"):
        assert f"  {name}" in output


def test_data_stats_prints_the_split_class_table(shard_run):
    _, out = shard_run(source="digits")
    result = CliRunner().invoke(cli, ["data", "stats", "--shards", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["class", "train", "val", "total"]
    assert any(line.split()[:1] == ["7"] for line in lines)
    assert "seen 1797 = accepted 1797 + rejected 0 + duplicates 0" in result.output


def test_data_stats_without_shards_says_what_to_run(tmp_path):
    result = CliRunner().invoke(cli, ["data", "stats", "--shards", str(tmp_path)])
    assert result.exit_code == 1 and "run the shard stage first" in result.output


def test_run_rejects_an_unknown_stage_before_starting(monkeypatch):
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(cli, ["run", "--until", "nope"])
    assert result.exit_code == 2 and "unknown stage 'nope'" in result.output and "shard" in result.output


def test_commands_outside_a_project_say_where_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["run"])
    assert result.exit_code == 1 and "no dvc.yaml" in result.output


def test_data_tokens_prints_rows_histogram_and_unused_codes(tmp_path):
    root = write_token_cache(tmp_path / "tokens")
    result = CliRunner().invoke(cli, ["data", "tokens", "--tokens", str(root)])
    assert result.exit_code == 0, result.output
    assert "class  train v0  train v1  val v0  total" in result.output
    assert "never used: 3 of 8 codes: 3, 4, 7" in result.output
    assert any(line.split()[:3] == ["distinct", "codes", "4"] for line in result.output.splitlines())


def test_data_tokens_default_path_and_missing_cache(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("paths:\n  tokens: cache/tok\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["data", "tokens"])
    assert result.exit_code == 1
    assert "cache/tok/train.parquet not found" in result.output and "dvc repro cache_tokens" in result.output
