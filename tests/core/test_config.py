"""Strict params loading: a bad key fails before any work, naming the key."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from core.config import ConfigError, Paths, as_flat_dict, as_params, from_dict, load_section, read_params

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, kw_only=True)
class Inner:
    rate: float = 0.1


@dataclass(frozen=True, kw_only=True)
class Example:
    size: int
    name: str = "x"
    kind: Literal["a", "b"] = "a"
    flag: bool = False
    scales: tuple[int, ...] = (1, 2)
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {self.size}")


def test_valid_section_loads_with_defaults_and_converted_types():
    cfg = from_dict(Example, {"size": 3, "scales": [1, 2, 3], "inner": {"rate": 1}}, prefix="ex")
    assert cfg.size == 3 and cfg.name == "x"
    assert cfg.scales == (1, 2, 3)
    assert cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"size": 3, "colour": 1}, "ex.colour: unknown key"),
        ({}, "ex.size: missing required key"),
        ({"size": "16"}, "ex.size: expected int, got str '16'"),
        ({"size": True}, "ex.size: expected int, got bool"),
        ({"size": 1.5}, "ex.size: expected int, got float"),
        ({"size": 1, "kind": "c"}, "ex.kind: expected one of 'a', 'b'"),
        ({"size": 1, "flag": "yes"}, "ex.flag: expected bool"),
        ({"size": 1, "scales": [1, "2"]}, "ex.scales[1]: expected int"),
        ({"size": 1, "limit": "none"}, "ex.limit: expected int or null"),
        ({"size": 1, "inner": {"rate": 0.1, "typo": 2}}, "ex.inner.typo: unknown key"),
        ({"size": -1}, "ex: size must be >= 0"),
    ],
)
def test_bad_keys_fail_naming_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        from_dict(Example, data, prefix="ex")
    assert message in str(info.value)


def test_missing_section_and_missing_file_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no section 'shard'"):
        load_section({}, "shard", Example)
    with pytest.raises(ConfigError, match="parameters file not found"):
        read_params(tmp_path / "params.yaml")


def test_flat_dict_for_mlflow_params():
    cfg = Example(size=2)
    flat = as_flat_dict(cfg)
    assert flat["size"] == 2 and flat["inner.rate"] == 0.1


def test_every_section_of_the_shipped_params_loads():
    """Each params.yaml section maps to a stage Config (or Paths) and loads strictly."""
    import importlib

    from core.durable import DurableConfig

    params = read_params(REPO / "params.yaml")
    load_section(params, "paths", Paths)
    load_section(params, "durable", DurableConfig)  # not a stage: what durable runs do afterwards
    stage_sections = [s for s in params if s not in ("paths", "durable")]
    assert stage_sections, "params.yaml has no stage sections"
    for section in stage_sections:
        module = importlib.import_module(f"stages.{section}")
        load_section(params, section, module.Config)


def section_classes(params: dict) -> dict:
    import importlib

    from core.durable import DurableConfig

    special = {"paths": Paths, "durable": DurableConfig}
    return {s: special.get(s) or importlib.import_module(f"stages.{s}").Config for s in params}


def test_no_config_default_disagrees_with_params_yaml():
    """params.yaml is the home of every default: a dataclass default (what a test or a script that
    builds a Config gets) equals the shipped value, so deleting nothing, or building a Config by
    hand, cannot silently train with another recipe than the pipeline's."""
    import dataclasses

    params = read_params(REPO / "params.yaml")
    drift = []
    for section, cls in section_classes(params).items():
        shipped = load_section(params, section, cls)
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if default != getattr(shipped, f.name):
                drift.append(f"{section}.{f.name}: default {default!r}, params.yaml {getattr(shipped, f.name)!r}")
    assert not drift, "Config defaults that disagree with params.yaml:\n" + "\n".join(drift)


@pytest.mark.parametrize("section", ["cca", "pretrain", "shard"])
def test_a_key_deleted_from_params_yaml_fails_by_name(section):
    params = read_params(REPO / "params.yaml")
    cls = section_classes(params)[section]
    key = next(iter(params[section]))
    del params[section][key]
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}: missing key"):
        load_section(params, section, cls)


def test_a_config_round_trips_through_plain_params():
    cfg = Example(size=3, scales=(4, 5), inner=Inner(rate=0.5))
    assert from_dict(Example, as_params(cfg), prefix="ex", complete=True) == cfg


@pytest.mark.parametrize(
    "section, old, new",
    [("pretrain", "sample_cfg", "sample_cfg_scales"), ("ddo", "sample_cfg", "sample_cfg_scales"),
     ("ddo", "fake_cfg", "fake_cfg_scale"), ("distill_pairs", "cfg", "cfg_scale")],
)  # fmt: skip
def test_a_renamed_key_fails_naming_its_new_name(section, old, new):
    """A params file from before the guidance-scale rename fails in one line that names the new key."""
    params = read_params(REPO / "params.yaml")
    params[section][old] = params[section].pop(new)
    with pytest.raises(ConfigError) as info:
        load_section(params, section, section_classes(params)[section])
    assert str(info.value) == f"{section}.{old}: unknown key ({old} was renamed {new}; rename it)"


def test_an_old_name_without_its_new_key_in_the_section_is_only_unknown():
    with pytest.raises(ConfigError, match=r"^ex\.cfg: unknown key \(known keys: "):
        from_dict(Example, {"size": 1, "cfg": 2.0}, prefix="ex")
