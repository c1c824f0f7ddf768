import json

import pytest
import torch

from core.training import NonFiniteLossError, Resume, build_accelerator, check_finite, resume_dir


def test_resume_dir_depends_on_params_and_inputs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"1")
    first = resume_dir(tmp_path / "r", "stage", {"lr": 1}, [data])
    assert first == resume_dir(tmp_path / "r", "stage", {"lr": 1}, [data])
    assert first != resume_dir(tmp_path / "r", "stage", {"lr": 2}, [data])
    (data / "a.bin").write_bytes(b"2")
    assert first != resume_dir(tmp_path / "r", "stage", {"lr": 1}, [data])
    assert first.parent == tmp_path / "r" / "stage"


def test_save_restore_and_finish(tmp_path):
    accelerator = build_accelerator("no")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    resume = Resume(accelerator, tmp_path / "state", save_every=2)
    assert resume.restore() == (0, [])
    for step in (1, 2, 3, 4, 5, 6):
        resume.step_done(step, [step])
    kept = sorted(p.name for p in (tmp_path / "state").glob("checkpoint_*"))
    assert kept == ["checkpoint_000000004", "checkpoint_000000006"]
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    assert Resume(accelerator, tmp_path / "state", save_every=2).restore() == (6, [6])
    assert torch.equal(model.weight, saved)
    assert json.loads((tmp_path / "state" / "checkpoint_000000006" / "state.json").read_text())["step"] == 6
    resume.finish()
    assert not (tmp_path / "state").exists()


def test_non_finite_loss_names_step_and_state(tmp_path):
    check_finite({"loss": torch.tensor(1.0)}, 3)
    resume = Resume(build_accelerator("no"), tmp_path, save_every=1)
    resume.last_saved = tmp_path / "checkpoint_000000002"
    with pytest.raises(NonFiniteLossError, match=r"step 3 \(recon=nan\).*checkpoint_000000002"):
        check_finite({"loss": torch.tensor(0.5), "recon": float("nan")}, 3, resume)


def test_compile_model_wraps_the_prepared_module_and_recorded_config_hides_compile_when_off():
    import dataclasses

    from core.training import compile_model, recorded_config

    module = torch.nn.Linear(2, 2)
    assert compile_model(module, False) is module
    compiled = compile_model(module, True)
    # a wrapper around the same module: accelerate keeps saving the module's own keys
    assert compiled is not module and compiled._orig_mod is module
    assert list(module.state_dict()) == ["weight", "bias"]

    @dataclasses.dataclass(frozen=True)
    class Config:
        steps: int = 3
        compile: bool = False

    assert recorded_config(Config()) == {"steps": 3}
    assert recorded_config(Config(compile=True)) == {"steps": 3, "compile": True}
