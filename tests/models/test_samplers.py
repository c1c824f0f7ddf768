"""models/samplers.py: one factory and one interface over AR models and distilled students."""

import dataclasses

import pytest
import torch
from helpers import TINY_VQ

from models.ar import sample_images
from models.dd import code_space
from models.dd_student import DDConfig, sample_distilled_images, student_from_teacher
from models.gpt import GPT, GPTConfig
from models.samplers import ARSampler, SamplingSettings, StudentSampler, sampler_from_state
from models.tokenizers import build_tokenizer

LABELS = torch.tensor([0, 1, 2, 0, 1])
SETTINGS = SamplingSettings(guidance={"cfg1": 1.0, "cfg3": 3.0})


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return build_tokenizer("vq", {**TINY_VQ, "image_size": 8}).eval()  # 16 tokens (4 x 4), 32 codes


def gpt(seed: int = 1) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=32, seq_len=16, grid=(4, 4), num_classes=3, depth=1, width=32, heads=2)).eval()


def ar_checkpoint() -> tuple[dict, dict]:
    model = gpt()
    return model.state_dict(), {"arch": "gpt", "model": model.config_dict()}


def student_checkpoint(tokenizer, two_step_at: int = 4) -> tuple[dict, dict]:
    """What ``distill`` writes: the student's weights, its teacher's architecture, ``dd`` and ``teacher``."""
    teacher = gpt()
    codebook_VD, _ = code_space(tokenizer)
    dd = DDConfig(code_dim=codebook_VD.shape[1], split=12 if two_step_at else 0, two_step_at=two_step_at)
    student = student_from_teacher("gpt", teacher, dd, codebook_VD)
    config = {"arch": "gpt", "model": teacher.config_dict(), "dd": dataclasses.asdict(dd), "distilled": True,
              "teacher": {"name": "base", "cfg_scale": 2.0, "guidance_schedule": "constant"}}  # fmt: skip
    return student.state_dict(), config


def test_one_factory_gives_each_checkpoint_its_modes_behind_the_same_calls(tokenizer):
    ar = sampler_from_state(*ar_checkpoint(), tokenizer, SETTINGS)
    student = sampler_from_state(*student_checkpoint(tokenizer), tokenizer, SETTINGS)
    assert isinstance(ar, ARSampler) and isinstance(student, StudentSampler)
    assert ar.modes == ("cfg1", "cfg3") and student.modes == ("1step", "2step")
    assert (ar.steps_per_image, ar.passes("cfg3")) == (16, 16)
    assert student.steps_per_image is None and [student.passes(m) for m in student.modes] == [1, 2]
    assert ar.registrable and not student.registrable
    assert ar.teacher is None and student.teacher["name"] == "base" and ar.arch == student.arch == "gpt"
    for sampler in (ar, student):  # the caller's loop: it never asks which kind it holds
        for mode in sampler.modes:
            images = sampler.sample(LABELS, mode, seed=3, batch_size=2)
            assert images.shape == (5, 8, 8, 3) and images.dtype == torch.uint8
            assert torch.equal(images, sampler.sample(LABELS, mode, seed=3, batch_size=2))
        assert sampler.token_latency_ms(LABELS[:2], sampler.modes[-1], seed=0) > 0
    # the same draws as the family's own sampling functions
    expected = sample_images(ar.model, tokenizer, LABELS, cfg_scale=3.0, seed=3, batch_size=2)
    assert torch.equal(ar.sample(LABELS, "cfg3", seed=3, batch_size=2), expected)
    expected = sample_distilled_images(student.student, tokenizer, LABELS, steps=2, seed=3, batch_size=2)
    assert torch.equal(student.sample(LABELS, "2step", seed=3, batch_size=2), expected)


def test_a_student_without_a_kept_prefix_samples_in_one_step_only(tokenizer):
    """DD2's generator has ``two_step_at`` 0, like this student: no second step to offer."""
    student = sampler_from_state(*student_checkpoint(tokenizer, two_step_at=0), tokenizer, SETTINGS)
    assert student.modes == ("1step",)


def test_a_teacher_at_its_distillation_guidance_shares_the_model_and_the_filters(tokenizer):
    ar = sampler_from_state(*ar_checkpoint(), tokenizer, SamplingSettings(guidance={"cfg1": 1.0}, temperature=0.9))
    teacher = ar.with_guidance({"cfg2": (2.0, "constant")})
    assert teacher.modes == ("cfg2",) and teacher.model is ar.model and teacher.temperature == 0.9
    expected = sample_images(ar.model, tokenizer, LABELS, cfg_scale=2.0, temperature=0.9, seed=0, batch_size=5)
    assert torch.equal(teacher.sample(LABELS, "cfg2", seed=0, batch_size=5), expected)
