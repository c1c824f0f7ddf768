"""Self-Autoregressive Refinement (SAR; Zhou et al. 2025): exposure-bias repair for next-scale models.

A next-scale model is trained on ground-truth coarse scales but samples from its own. SAR adds one
extra forward per step in which some scales see the model's *own prediction* of the scale before
them (Stagger-Scale Rollout, SSR), and pulls those student-forced predictions toward the
teacher-forced ones (Contrastive Student-Forcing Loss, CSFL):

    L = CE(z^T, y) + σ · CE(z^S[student-forced scales], sg(ŷ^T)[student-forced scales])

with z^T the teacher-forced logits on ground truth y, ŷ^T = argmax (or a sample) of z^T, and z^S
the logits of the student-forced pass. The target is the teacher-forced *prediction*, a detached
index, not the ground truth (``target="ground_truth"`` is the paper's worse "naive" ablation).

Residual VAR, full-context adaptation (not the authors' FlexVAR, whose scale-k input is the
upsampled codes of scale k−1 alone): the input of scale k+1 is the area-downsampled accumulated
reconstruction f̂ of scales 0..k, so it is rebuilt with ground truth at scales < k and the
prediction ŷ^T_k at scale k, i.e. exactly the input the model would see at scale k+1 had it
sampled scale k itself on a ground-truth context. Which transitions k → k+1 are student-forced:
``last`` (only K−2 → K−1: the released code) or ``all`` (every one: the paper's text).

Pure functions of tensors and the frozen quantizer; the stage (stages/sar.py) feeds them batches.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from models.sampling import sample_tokens

Transitions = Literal["last", "all"]
Target = Literal["teacher", "ground_truth"]


def student_forced_scales(num_scales: int, transitions: Transitions) -> list[int]:
    """Indices of the scales whose input is built from the model's prediction of the scale before
    (scale 0's input is the class start token, so it is never student-forced)."""
    if num_scales < 2:
        raise ValueError(f"student forcing needs at least 2 scales, got {num_scales}")
    if transitions == "last":
        return [num_scales - 1]
    if transitions == "all":
        return list(range(1, num_scales))
    raise ValueError(f"unknown transitions {transitions!r}: expected 'last' or 'all'")


def scale_mask(scales: tuple[int, ...] | list[int], chosen: list[int], device=None) -> torch.Tensor:
    """Bool (L,) over the token positions: True on the positions of the ``chosen`` scales (the
    forced positions: ``student_forced_scales``; the rolled-out ones: those scales minus one)."""
    levels_L = torch.cat([torch.full((side * side,), k, dtype=torch.long) for k, side in enumerate(scales)])
    return torch.isin(levels_L, torch.tensor(chosen, dtype=torch.long)).to(device)


@torch.no_grad()
def rollout_tokens(
    logits_BLV: torch.Tensor,
    *,
    mode: Literal["argmax", "sample"] = "argmax",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The model's own predictions ŷ^T (B, L) int64 from teacher-forced logits, without gradient.

    ``argmax`` (what the authors' scripts intend) or ``sample`` (their trainer's default) with
    temperature / top-k / top-p; sampling runs on the CPU with ``generator`` (a CPU generator),
    so the draws do not depend on the device."""
    if mode == "argmax":
        return logits_BLV.detach().argmax(dim=-1)
    if mode == "sample":
        logits = logits_BLV.detach().float().cpu()
        tokens = sample_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        return tokens.to(logits_BLV.device)
    raise ValueError(f"unknown rollout mode {mode!r}: expected 'argmax' or 'sample'")


ROLLOUT_SCHEDULES = {
    "sar": lambda ratio: 0.5 * (1 + ratio),
    "linear": lambda ratio: ratio,
    "constant": lambda ratio: torch.ones_like(ratio),
}
"""t_k / strength at scale position ratio k/(K−1): the SAR trainer's ramp from half to full, VAR's
sampler's ramp from 0, or no ramp."""


@torch.no_grad()
def guided_rollout_logits(
    cond_BLV: torch.Tensor,
    uncond_BLV: torch.Tensor,
    scales: tuple[int, ...] | list[int],
    strength: float,
    schedule: Literal["sar", "linear", "constant"] = "sar",
) -> torch.Tensor:
    """The authors' rollout guidance: at scale k of K, ``(1 + t_k)·cond − t_k·uncond`` with
    ``t_k = strength · 0.5 · (1 + k/(K−1))`` (``schedule`` "sar": their ``sf_cfg_scale`` 1.2 ramps t
    from 0.6 to 1.2, i.e. guidance 1.6 → 2.2 in the ``u + s·(c − u)`` convention); "linear":
    ``t_k = strength · k/(K−1)``, VAR's sampler; "constant": ``t_k = strength``. ``strength`` 0
    returns ``cond``. fp32, detached: the guided logits only choose the rolled-out tokens."""
    cond, uncond = cond_BLV.detach().float(), uncond_BLV.detach().float()
    if strength == 0:
        return cond
    K = len(scales)
    levels_L = torch.cat([torch.full((side * side,), k, dtype=torch.float32) for k, side in enumerate(scales)])
    t_L1 = (strength * ROLLOUT_SCHEDULES[schedule](levels_L / max(K - 1, 1)))[:, None].to(cond.device)
    return cond + t_L1 * (cond - uncond)


@torch.no_grad()
def student_forced_input(
    quantizer, tokens_BL: torch.Tensor, predicted_BL: torch.Tensor, forced_scales: list[int]
) -> torch.Tensor:
    """Next-scale inputs (B, L − s_0², C), fp32, with the ``forced_scales`` rebuilt from predictions.

    For each forced scale k+1 its rows hold ``quantizer.teacher_forcing_input`` of the ground truth
    with scale k replaced by ``predicted_BL``'s scale k (full context: ground truth below k); every
    other row is the teacher-forcing input itself. Built by the quantizer's own code path on the
    same batch, so a row equals the teacher-forced one bit for bit wherever the predicted scale k
    equals the ground truth."""
    sizes = [side * side for side in quantizer.scales]
    starts = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    inputs_BLC = quantizer.teacher_forcing_input(tokens_BL)
    first = sizes[0]
    for k in forced_scales:
        if not 1 <= k < len(sizes):
            raise ValueError(f"scale {k} cannot be student-forced: expected 1..{len(sizes) - 1}")
        mixed_BL = tokens_BL.clone()
        mixed_BL[:, starts[k - 1] : starts[k]] = predicted_BL[:, starts[k - 1] : starts[k]]
        rows = slice(starts[k] - first, starts[k + 1] - first)
        inputs_BLC[:, rows] = quantizer.teacher_forcing_input(mixed_BL)[:, rows]
    return inputs_BLC


def sar_loss(
    teacher_logits_BLV: torch.Tensor,
    student_logits_BLV: torch.Tensor,
    tokens_BL: torch.Tensor,
    predicted_BL: torch.Tensor,
    forced_L: torch.Tensor,
    rolled_L: torch.Tensor,
    *,
    sigma: float,
    target: Target = "teacher",
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_TF + σ·L_CSFL`` and its monitors.

    ``teacher_logits_BLV``: the teacher-forced pass (ground-truth inputs); ``student_logits_BLV``:
    the student-forced pass; ``predicted_BL``: ŷ^T drawn from the teacher-forced logits (indices,
    so no gradient reaches them); ``forced_L``: bool mask of the student-forced positions,
    ``rolled_L`` of the positions whose predictions built their inputs (the scales before them).
    ``L_TF`` is the mean CE over every token (VAR's uniform weighting), ``L_CSFL`` the mean CE of
    the student-forced positions against ŷ^T (``target="teacher"``) or the ground truth
    (``"ground_truth"``, the naive ablation). The student-forced logits get gradient only at the
    forced positions. Monitors: ``tf_loss``, ``csfl`` (the term σ multiplies), ``sf_loss`` (CE of
    the student-forced positions against the ground truth, the exposure-bias gap next to the
    teacher-forced CE of the same positions, ``tf_loss_forced``), ``disagreement`` (fraction of
    the rolled-out tokens ŷ^T that differ from the ground truth: how far the student-forced inputs
    are from the teacher-forced ones) and ``sf_agreement`` (fraction of forced positions where the
    student-forced argmax equals ŷ^T: what the CSFL pulls up)."""
    if target not in ("teacher", "ground_truth"):
        raise ValueError(f"unknown target {target!r}: expected 'teacher' or 'ground_truth'")
    if not bool(forced_L.any()):
        raise ValueError("no student-forced positions")
    tf_nll_BL = F.cross_entropy(teacher_logits_BLV.float().transpose(1, 2), tokens_BL, reduction="none")
    tf_loss = tf_nll_BL.mean()
    student_BlV = student_logits_BLV[:, forced_L].float()
    goal_Bl = (predicted_BL if target == "teacher" else tokens_BL)[:, forced_L].detach()
    csfl = F.cross_entropy(student_BlV.transpose(1, 2), goal_Bl)
    loss = tf_loss + sigma * csfl
    with torch.no_grad():
        truth_Bl = tokens_BL[:, forced_L]
        monitors = {
            "tf_loss": float(tf_loss),
            "csfl": float(csfl),
            "sf_loss": float(F.cross_entropy(student_BlV.transpose(1, 2), truth_Bl)),
            "tf_loss_forced": float(tf_nll_BL[:, forced_L].mean()),
            "disagreement": float((predicted_BL[:, rolled_L] != tokens_BL[:, rolled_L]).float().mean()),
            "sf_agreement": float((student_BlV.argmax(-1) == predicted_BL[:, forced_L]).float().mean()),
        }
    return loss, monitors
