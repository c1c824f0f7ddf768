"""SAR objective: the student-forced input, the CSFL on tiny known cases, where gradients flow."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.residual_quantizer import MultiScaleResidualQuantizer
from models.sar import (
    guided_rollout_logits,
    rollout_tokens,
    sar_loss,
    scale_mask,
    student_forced_input,
    student_forced_scales,
)
from models.var import VAR, VARConfig

VOCAB, CLASSES, EMBED, SCALES = 32, 3, 8, (1, 2, 3, 4)
SEQ_LEN = 30
BOUNDS = [0, 1, 5, 14, 30]  # scale k holds positions BOUNDS[k] : BOUNDS[k + 1]


def tiny_model(seed: int = 0) -> VAR:
    """A tiny VAR whose quantizer has unit-scale random codes (inputs differ visibly per token)
    and whose wide init makes outputs depend strongly on the inputs."""
    torch.manual_seed(seed)
    quantizer = MultiScaleResidualQuantizer(
        codebook_size=VOCAB, dim=EMBED, scales=SCALES, commitment_weight=0.25, quant_resi=0.5,
        share_quant_resi=4, usage_momentum=0.99, dead_code_threshold=0.1, restart_every=0,
        candidate_buffer_size=16, scale_normalization=False, normalization_momentum=0.99,
        restart_per_scale=True, restart_max_total_share=1.0,
    )  # fmt: skip
    with torch.no_grad():
        quantizer.codebook.weight.normal_()
    config = VARConfig(vocab_size=VOCAB, scales=SCALES, embed_dim=EMBED, num_classes=CLASSES, depth=2, width=32,
                       heads=2, init_std=0.3, init_head=1.0, init_adaln=1.0, init_adaln_gamma=1.0,
                       drop_path=0.0)  # fmt: skip
    return VAR(config, quantizer).eval()


def random_batch(batch: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQ_LEN), generator=gen), torch.randint(0, CLASSES, (batch,), generator=gen)


def test_which_scales_are_student_forced():
    assert student_forced_scales(4, "last") == [3]
    assert student_forced_scales(4, "all") == [1, 2, 3]
    mask = scale_mask(SCALES, [1, 3])
    assert mask.tolist() == [False] + [True] * 4 + [False] * 9 + [True] * 16
    with pytest.raises(ValueError, match="at least 2 scales"):
        student_forced_scales(1, "last")
    with pytest.raises(ValueError, match="transitions"):
        student_forced_scales(4, "some")


def test_student_forced_input_equals_teacher_forced_when_predictions_are_ground_truth():
    model = tiny_model()
    tokens, _ = random_batch()
    teacher = model.teacher_forcing_input(tokens)
    for transitions in ("last", "all"):
        student = student_forced_input(model.quantizer, tokens, tokens.clone(), student_forced_scales(4, transitions))
        assert torch.equal(student, teacher)


@pytest.mark.parametrize("transitions", ["last", "all"])
def test_student_forced_input_differs_exactly_where_predictions_differ(transitions):
    """Input rows of scale k+1 change (for a row b) iff the prediction of scale k differs from the
    ground truth in that row, and only at student-forced scales."""
    model = tiny_model()
    tokens, _ = random_batch(batch=6)
    predicted = tokens.clone()
    gen = torch.Generator().manual_seed(1)
    # row 0: exact; rows 1-2: one wrong token at scale 2 (feeds scale 3, the last); rows 3-5: every
    # scale but the last has one wrong token
    predicted[1, BOUNDS[2]] = (tokens[1, BOUNDS[2]] + 1) % VOCAB
    predicted[2, BOUNDS[3] - 1] = (tokens[2, BOUNDS[3] - 1] + 5) % VOCAB
    for k in range(3):
        at = BOUNDS[k] + int(torch.randint(0, BOUNDS[k + 1] - BOUNDS[k], (1,), generator=gen))
        predicted[3:, at] = (tokens[3:, at] + 3) % VOCAB
    predicted[:, BOUNDS[3] :] = torch.randint(0, VOCAB, (6, 16), generator=gen)  # scale 3 feeds nothing
    forced = student_forced_scales(4, transitions)
    teacher = model.teacher_forcing_input(tokens)
    student = student_forced_input(model.quantizer, tokens, predicted, forced)
    first = BOUNDS[1]
    for k in range(1, 4):
        rows = slice(BOUNDS[k] - first, BOUNDS[k + 1] - first)
        changed = (student[:, rows] != teacher[:, rows]).flatten(1).any(dim=1)
        wrong = (predicted[:, BOUNDS[k - 1] : BOUNDS[k]] != tokens[:, BOUNDS[k - 1] : BOUNDS[k]]).any(dim=1)
        expected = wrong if k in forced else torch.zeros_like(wrong)
        assert torch.equal(changed, expected), (transitions, k)
    assert student.shape == teacher.shape == (6, SEQ_LEN - 1, 8)


def test_student_forced_input_is_the_input_the_model_would_sample_from():
    """Full context: scale k+1's input is what ``next_scale_input`` builds after ground-truth scales
    0..k−1 and the predicted scale k, the sampling path's own arithmetic."""
    model = tiny_model()
    tokens, _ = random_batch(batch=3)
    predicted = torch.randint(0, VOCAB, tokens.shape, generator=torch.Generator().manual_seed(2))
    student = student_forced_input(model.quantizer, tokens, predicted, [1, 2, 3])
    quantizer = model.quantizer
    for k in range(3):
        f_hat = quantizer.empty_f_hat(3)
        for j in range(k):
            f_hat, _ = quantizer.next_scale_input(f_hat, j, tokens[:, BOUNDS[j] : BOUNDS[j + 1]])
        _, expected = quantizer.next_scale_input(f_hat, k, predicted[:, BOUNDS[k] : BOUNDS[k + 1]])
        got = student[:, BOUNDS[k + 1] - 1 : BOUNDS[k + 2] - 1]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rollout_argmax_and_seeded_sampling():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]]])
    assert rollout_tokens(logits).tolist() == [[1, 0]]
    draw = [rollout_tokens(logits, mode="sample", generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    assert rollout_tokens(logits, mode="sample", top_k=1, generator=torch.Generator()).tolist() == [[1, 0]]
    with pytest.raises(ValueError, match="rollout mode"):
        rollout_tokens(logits, mode="beam")


def test_loss_values_on_a_tiny_known_case():
    """Two positions, vocabulary 2; position 1 is student-forced and was rolled out from position 0.
    Uniform teacher logits give CE log 2 everywhere; the student puts logit log 3 on token 1."""
    teacher = torch.zeros(1, 2, 2)
    student = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]])
    tokens = torch.tensor([[0, 0]])
    predicted = torch.tensor([[1, 1]])  # teacher predictions: token 1 at both positions
    forced, rolled = torch.tensor([False, True]), torch.tensor([True, False])
    loss, m = sar_loss(teacher, student, tokens, predicted, forced, rolled, sigma=0.5)
    # TF: log 2; CSFL: −log(3/4) (target = prediction 1); SF vs ground truth 0: −log(1/4)
    assert m["tf_loss"] == pytest.approx(math.log(2))
    assert m["csfl"] == pytest.approx(-math.log(0.75))
    assert m["sf_loss"] == pytest.approx(-math.log(0.25))
    assert m["tf_loss_forced"] == pytest.approx(math.log(2))
    assert m["disagreement"] == 1.0 and m["sf_agreement"] == 1.0
    assert float(loss) == pytest.approx(math.log(2) - 0.5 * math.log(0.75))
    naive, m = sar_loss(teacher, student, tokens, predicted, forced, rolled, sigma=0.5, target="ground_truth")
    assert m["csfl"] == pytest.approx(-math.log(0.25))
    assert float(naive) == pytest.approx(math.log(2) - 0.5 * math.log(0.25))
    zero, _ = sar_loss(teacher, student, tokens, predicted, forced, rolled, sigma=0.0)
    assert float(zero) == pytest.approx(math.log(2))


def test_gradient_reaches_only_the_forced_student_positions_and_the_teacher_ce():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 4, generator=gen, requires_grad=True)
    student = torch.randn(2, 5, 4, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 4, (2, 5), generator=gen)
    predicted = rollout_tokens(teacher)  # from the teacher logits, but indices: no gradient path
    forced = torch.tensor([False, False, True, True, False])
    rolled = torch.tensor([False, True, False, False, False])
    loss, _ = sar_loss(teacher, student, tokens, predicted, forced, rolled, sigma=0.1)
    loss.backward()
    assert student.grad[:, ~forced].abs().sum() == 0 and student.grad[:, forced].abs().sum() > 0
    # the teacher logits get exactly the gradient of the teacher-forced CE: the CSFL target is detached
    expected = torch.autograd.grad(F.cross_entropy(teacher.transpose(1, 2), tokens), teacher)[0]
    torch.testing.assert_close(teacher.grad, expected)


def test_csfl_trains_the_model_through_the_student_pass_only():
    """On a VAR: the CSFL reaches the transformer's weights; the quantizer gets nothing."""
    model = tiny_model().train()
    tokens, labels = random_batch()
    teacher = model(tokens, labels, label_dropout=False)
    predicted = rollout_tokens(teacher)
    inputs = student_forced_input(model.quantizer, tokens, predicted, [3])
    assert not inputs.requires_grad
    student = model.forward_from_inputs(inputs, labels, label_dropout=False)
    forced, rolled = scale_mask(SCALES, [3]), scale_mask(SCALES, [2])
    _, monitors = sar_loss(teacher, student, tokens, predicted, forced, rolled, sigma=1.0)
    csfl = F.cross_entropy(student[:, forced].transpose(1, 2), predicted[:, forced])
    assert csfl.item() == pytest.approx(monitors["csfl"], rel=1e-6)
    csfl.backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.word_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.quantizer.parameters())
    # scales before the forced one see the same inputs in both passes: same logits
    torch.testing.assert_close(student[:, ~forced], teacher[:, ~forced])


def test_rollout_guidance_ramps_from_half_to_full_strength_over_the_scales():
    """The authors' trainer: at scale k of K, (1 + t)·cond − t·uncond with t = g·0.5·(1 + k/(K−1))."""
    scales = (1, 2, 3)
    cond, uncond = torch.randn(2, 14, 5), torch.randn(2, 14, 5)
    guided = guided_rollout_logits(cond, uncond, scales, 1.2)
    for level, (start, stop) in enumerate([(0, 1), (1, 5), (5, 14)]):
        t = 1.2 * 0.5 * (1 + level / 2)
        torch.testing.assert_close(guided[:, start:stop], (1 + t) * cond[:, start:stop] - t * uncond[:, start:stop])
    assert torch.equal(guided_rollout_logits(cond, uncond, scales, 0.0), cond)
    # where the condition carries no information (cond == uncond) guidance changes nothing
    torch.testing.assert_close(guided_rollout_logits(cond, cond, scales, 2.0), cond)
