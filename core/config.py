"""Strict loading of params.yaml sections into frozen dataclasses.

Every stage owns one section of params.yaml and one ``Config`` dataclass. Loading fails before any
work starts when a key is unknown, missing or of the wrong type, and the message names the key
(``shard.image_size: expected int, got str '16'``). Supported field types: bool, int, float, str,
Literal[...], X | None, list[T], tuple[T, ...], dict[str, T] and nested dataclasses.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

T = TypeVar("T")

PARAMS_FILE = Path("params.yaml")

RENAMED = {"sample_cfg": "sample_cfg_scales", "fake_cfg": "fake_cfg_scale", "cfg": "cfg_scale"}
"""Old key -> its new name, for a params file written before the rename: the unknown-key error names
the new key when the section has it (``cfg`` only in ``distill_pairs``)."""


class ConfigError(ValueError):
    """A params.yaml key is unknown, missing or mistyped; the message names it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Paths:
    """Where each stage's artifacts live (params.yaml ``paths``; dvc.yaml reads the same keys)."""

    shards: str = "data/shards"
    """Webdataset tars, manifest.parquet, rejected.parquet and classes.json written by ``shard``."""
    metrics: str = "metrics"
    """Small JSON metrics per stage, tracked by git and DVC (``cache: false``)."""
    plots: str = "plots"
    """Per-stage curves as CSV for ``dvc plots``."""
    tokenizer: str = "data/tokenizer"
    """Trained tokenizer (model.safetensors + config.json) written by ``train_tokenizer``."""
    tokens: str = "data/tokens"
    """Token cache ({train,val}.parquet) written by ``cache_tokens``."""
    models: str = "data/models"
    """AR checkpoints, one folder per stage of the chain: ``base`` (pretrain), later ``sar``, ``cca``..."""
    evalnet: str = "data/evalnet"
    """Evaluation classifier (model.safetensors + config.json) written by ``train_evalnet``: its
    features and logits are the FID/IS/precision/recall space when no Inception weights are given."""
    distill: str = "data/distill"
    """Distillation pairs (pairs.parquet: label, noise, tokens) written by ``distill_pairs``."""
    eval: str = "data/eval"
    """Evaluation report (report.md) and sample grid (grid.png) written by ``evaluate``."""
    released: str = "released"
    """Released checkpoint files (LlamaGen, VAR) that ``train_tokenizer`` / ``pretrain`` import with
    ``init_from: released`` (see released/README.md)."""
    resume: str = ".arpipe/resume"
    """Local resume state of training stages (gitignored, never a DVC out; removed on success)."""
    last_run: str = ".arpipe/last_run"
    """What the last run measured or decided that changes from run to run: ``evaluate_speed.json``
    (images/s, latencies, speed-ups) and ``evaluate_registry.json`` (registered version, champion
    move). Gitignored and never a DVC out or metric (its md5 in dvc.lock would change on every
    run); MLflow holds the same figures (``speed/*``, ``arpipe.registry.*``)."""


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        hint = " (run from the repository root)" if path == PARAMS_FILE else ""
        raise ConfigError(f"{path}: parameters file not found{hint}")
    # YAML 1.2, as DVC reads and writes params.yaml: `dvc exp run -S` rewrites `"no"` as `no`,
    # which a YAML 1.1 reader (PyYAML) would turn into False
    try:
        with path.open() as f:
            params = YAML(typ="safe", pure=True).load(f) or {}
    except YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}:" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{line} not valid YAML ({problem})") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return params


def load_section(params: dict[str, Any], section: str, cls: type[T], *, complete: bool = True) -> T:
    """Build ``cls`` from ``params[section]``, checking every key and type. ``complete``: every
    field must be in the section, so a key deleted from params.yaml fails by name instead of
    silently taking the dataclass default (tests build partial Configs directly)."""
    if section not in params:
        raise ConfigError(f"no section '{section}' (add it, or run with the params file that has it)")
    return from_dict(cls, params[section], prefix=section, complete=complete)


def load_stage_config(params: dict[str, Any], stage: str, cls: type[T]) -> T:
    """Stage ``stage``'s Config from its section. A Config that reads keys of another stage's section
    (a ``params_section`` class attribute: ``init_model`` reads ``pretrain.arch``, ``init_from`` and
    ``init_version``) takes its own fields from there, each required, and leaves the section's other
    keys to the stage that owns it, so no key is written twice."""
    section = getattr(cls, "params_section", stage)
    if section == stage:
        return load_section(params, stage, cls)
    if not isinstance(params.get(section), dict):
        return load_section(params, section, cls)  # fails naming the missing or malformed section
    own = {f.name for f in dataclasses.fields(cls) if f.init}
    return from_dict(cls, {k: v for k, v in params[section].items() if k in own}, prefix=section, complete=True)


def load_paths(params: dict[str, Any]) -> Paths:
    """``paths``: a key left out keeps its default (dvc.yaml reads the same keys from params.yaml)."""
    return load_section(params, "paths", Paths, complete=False) if "paths" in params else Paths()


def from_dict(cls: type[T], data: Any, *, prefix: str, complete: bool = False) -> T:
    """``cls`` from a mapping: unknown keys and wrong types fail first, naming the key, then missing
    keys (those without a default, or every one with ``complete``, nested dataclasses included)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = unknown[0]
        if RENAMED.get(name) in fields:
            raise ConfigError(f"{prefix}.{name}: unknown key ({name} was renamed {RENAMED[name]}; rename it)")
        raise ConfigError(f"{prefix}.{name}: unknown key (known keys: {', '.join(sorted(fields))})")
    hints = get_type_hints(cls)
    values = {name: _check(hints[name], data[name], f"{prefix}.{name}", complete) for name in fields if name in data}
    for name, field in fields.items():
        if name in data:
            continue
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        if complete:
            raise ConfigError(f"{prefix}.{name}: missing key (every key of the section must be in the params file)")
        if not has_default:
            raise ConfigError(f"{prefix}.{name}: missing required key")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # __post_init__ range checks
        raise ConfigError(f"{prefix}: {exc}") from exc


def as_params(obj: Any) -> Any:
    """A Config (or any value in one) as plain YAML data: the inverse of ``from_dict``, so
    ``from_dict(cls, as_params(cfg), complete=True) == cfg``."""
    if dataclasses.is_dataclass(obj):
        return {f.name: as_params(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [as_params(v) for v in obj]
    if isinstance(obj, dict):
        return {k: as_params(v) for k, v in obj.items()}
    return obj


def _check(tp: Any, value: Any, key: str, complete: bool = False) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _check(option, value, key, complete)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {_describe(value)}")
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        choices = ", ".join(repr(a) for a in get_args(tp))
        raise ConfigError(f"{key}: expected one of {choices}, got {_describe(value)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key, complete=complete)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_check(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        items = [_check(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_check(key_tp, k, f"{key}.{k}"): _check(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{key}: unsupported field type {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass: the string literal written under each field, as in
    ``size: int = 16`` followed by ``\"\"\"Pixels, square.\"\"\"`` (read from the source; a field without
    one maps to ""). Inherited fields are looked up in the base classes."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:] + [None], strict=True):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                doc = ""
                if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                    doc = inspect.cleandoc(str(after.value.value))
                docs[node.target.id] = doc
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls) if f.init}


def field_default(field: dataclasses.Field) -> Any:
    """A field's default value (calling its default factory), or ``dataclasses.MISSING``."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def type_name(tp: Any) -> str:
    """A readable type: ``int``, ``list[float]``, ``'gpt' | 'var'``, ``str or null``."""
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (list, tuple, dict):
        args = ", ".join("..." if a is Ellipsis else type_name(a) for a in get_args(tp))
        return f"{get_origin(tp).__name__}[{args}]" if args else get_origin(tp).__name__
    return _type_name(tp)


def as_flat_dict(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a (nested) config dataclass to ``{"a.b": value}`` for MLflow params."""
    out: dict[str, Any] = {}
    for name, value in dataclasses.asdict(obj).items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            for sub, sub_value in _flatten_mapping(value, f"{key}."):
                out[sub] = sub_value
        else:
            out[key] = value
    return out


def flatten_params(params: dict[str, Any]) -> dict[str, Any]:
    """params.yaml as ``{"pretrain.lr": 0.001, "train_tokenizer.model.z_channels": 32, ...}`` (lists
    stay whole), the keys stage runs log their params under."""
    return dict(_flatten_mapping(params, ""))


def _flatten_mapping(mapping: dict, prefix: str) -> typing.Iterator[tuple[str, Any]]:
    for name, value in mapping.items():
        if isinstance(value, dict):
            yield from _flatten_mapping(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value
