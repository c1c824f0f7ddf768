"""core.finetune: the stage config base (re-declared fields keep their place, take the stage's
default and docstring), wrap-around batches, the EMA output."""

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from core.config import field_docs
from core.finetune import FinetuneConfig, GuidedFinetuneConfig, batch_at, batch_index, output_weights
from core.training import EMA


@dataclass(frozen=True, kw_only=True)
class Tiny(GuidedFinetuneConfig):
    batch_size: int = 4
    """Rows per step."""
    lr: float = 1e-3
    decay: str = "constant"
    log_every: int = 1
    """Steps between logged rows."""
    save_every: int = 7
    beta: float = 0.5
    """The objective's own field."""


def test_a_stage_config_redeclares_base_fields_in_place_with_its_default_and_docstring():
    names = [f.name for f in dataclasses.fields(Tiny)]
    assert names[:2] == ["batch_size", "lr"] and names[-2:] == ["sample_cfg_scales", "beta"]
    assert names.index("save_every") == [f.name for f in dataclasses.fields(FinetuneConfig)].index("save_every")
    cfg = Tiny()
    assert (cfg.save_every, cfg.sample_cfg_scales, cfg.betas) == (7, [1.0, 3.0], (0.9, 0.95))
    docs = field_docs(Tiny)
    assert docs["batch_size"] == "Rows per step." and docs["beta"] == "The objective's own field."
    assert docs["save_every"] == "" and docs["lr"] == ""  # re-declared without one: none, not the base's
    assert docs["weight_decay"] == "AdamW decay on matmul weights only."  # inherited


@pytest.mark.parametrize(
    "bad, key", [({"batch_size": 0}, "batch_size"), ({"warmup_steps": -1}, "warmup_steps"), ({"lr": 0.0}, "lr"),
                 ({"sample_cfg_scales": []}, "sample_cfg_scales")],
)  # fmt: skip
def test_bad_values_fail_naming_the_field(bad, key):
    with pytest.raises(ValueError, match=key):
        Tiny(**bad)


def test_batches_are_seeded_epoch_permutations_that_wrap_around():
    cfg = Tiny(batch_size=4)
    rows = 10  # 3 batches per epoch: the third holds rows 8, 9 and wraps to the first two
    epoch = np.concatenate([batch_index(cfg, rows, step) for step in range(3)])
    assert sorted(epoch[:rows]) == list(range(rows)) and list(epoch[rows:]) == list(epoch[:2])
    assert not np.array_equal(batch_index(cfg, rows, 3), batch_index(cfg, rows, 0))  # a new permutation
    assert np.array_equal(batch_index(cfg, rows, 4), batch_index(cfg, rows, 4))
    tokens_NL = np.arange(rows * 2, dtype=np.uint16).reshape(rows, 2)
    tokens_BL, labels_B = batch_at(cfg, tokens_NL, np.arange(rows, dtype=np.uint8), 1)
    assert tokens_BL.dtype == labels_B.dtype == torch.int64
    assert torch.equal(labels_B, torch.from_numpy(batch_index(cfg, rows, 1)))


def test_output_weights_are_the_ema_copy_or_the_model_itself():
    model = torch.nn.Linear(2, 2)
    assert output_weights(model, None) is model
    ema = EMA(model, 0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    averaged = output_weights(model, ema)
    assert averaged is not model and torch.allclose(averaged.weight, model.weight - 0.5)
