"""dvc.yaml's code deps cannot drift from the code: each stage lists exactly the first-party files
its module imports (transitively, function-level imports included), with ``models`` as one folder,
so a code change re-runs what it affects and nothing else is marked up to date by mistake."""

import ast

import pytest
import yaml
from helpers import REPO

PACKAGES = ("core", "models", "stages", "arpipe", "flows")
SIDE_CHANNELS = {"core/tracking.py", "core/errors.py", "core/progress.py"}
"""Imported by every stage but never shapes a DVC out: MLflow runs, spooling, tags; how an error
or Ctrl-C is reported on the console; progress lines (a change to them must not re-run the
pipeline)."""
LOADED_BY_PATH = {"evaluate": {"arpipe/pyfunc_model.py"}}
"""Code a stage hands to another program by file name: evaluate registers the sampler as an MLflow
"model from code", so a change to it must re-run evaluate (and re-register)."""
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(name: str):
    path = REPO.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(path) -> set:
    """First-party files ``path`` imports anywhere in its body (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES and (file := module_file(name)) is not None:
                found.add(file)
    return found


def closure(start) -> set:
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(imported_files(path) - seen)
    return seen


def expected_deps(stage: str) -> set[str]:
    deps = set()
    for path in closure(REPO / "stages" / f"{stage}.py"):
        rel = path.relative_to(REPO)
        if rel.name == "__init__.py" and path.stat().st_size == 0:
            continue  # an empty package marker holds no code
        deps.add("models" if rel.parts[0] == "models" else rel.as_posix())
    return (deps - SIDE_CHANNELS) | LOADED_BY_PATH.get(stage, set())


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_depends_on_exactly_the_code_it_imports(stage):
    listed = {d for d in STAGES[stage]["deps"] if d.split("/")[0] in PACKAGES}
    expected = expected_deps(stage)
    assert not expected - listed, f"dvc.yaml {stage}: code it imports but does not list: {sorted(expected - listed)}"
    assert not listed - expected, f"dvc.yaml {stage}: listed code it never imports: {sorted(listed - expected)}"
