import json
import math

import pytest
import torch
import torch.nn.functional as F

from models.gpt import GPT, GPTConfig
from models.sampling import classifier_free_guidance
from models.transformer_blocks import Dropout, KVCache, RMSNorm, TransformerBlock, apply_rotary, grid_rotation

VOCAB, CLASSES, GRID = 16, 3, (2, 3)


def tiny_config(**overrides) -> GPTConfig:
    fields = dict(
        vocab_size=VOCAB, seq_len=GRID[0] * GRID[1], grid=GRID, num_classes=CLASSES,
        depth=2, width=32, heads=2,
    )  # fmt: skip
    return GPTConfig(**(fields | overrides))


def tiny_model(seed: int = 0, **overrides) -> GPT:
    """A tiny model with a random (not zero) head and a wide init, so attention is sharp and
    outputs depend strongly on inputs and positions."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**({"init_std": 0.3} | overrides)))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


def random_batch(batch: int = 4, seed: int = 0, seq_len: int = GRID[0] * GRID[1]):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq_len), generator=gen)
    labels = torch.randint(0, CLASSES, (batch,), generator=gen)
    return tokens, labels


# -- configuration -----------------------------------------------------------------------------


def test_width_and_heads_derive_from_depth_unless_overridden():
    cfg = GPTConfig(vocab_size=512, seq_len=64, num_classes=10, depth=3)
    assert (cfg.model_width, cfg.num_heads, cfg.head_dim, cfg.grid) == (192, 3, 64, (8, 8))
    bench = GPTConfig(vocab_size=512, seq_len=64, num_classes=10, depth=8, width=256, heads=8)
    assert (bench.model_width, bench.num_heads, bench.head_dim, bench.ffn_hidden) == (256, 8, 32, 704)
    # the performance-benchmark model (GPT-M of the reference brief) builds at its documented size
    assert 6.6e6 < GPT(bench).num_params() < 6.8e6


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(seq_len=7, grid=None), "not square"),
        (dict(grid=(3, 3)), "does not hold"),
        (dict(width=30, heads=3), "divisible by 4"),
        (dict(class_dropout=1.5), "class_dropout"),
    ],
)
def test_bad_configs_fail_naming_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_dict_round_trip_rebuilds_the_same_model():
    model = tiny_model()
    rebuilt = GPT(GPTConfig(**json.loads(json.dumps(model.config_dict())))).eval()
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    tokens, labels = random_batch()
    assert torch.equal(rebuilt(tokens, labels), model(tokens, labels))


def test_interface_facts():
    model = tiny_model()
    assert model.steps == 6 and model.num_classes == CLASSES and model.null_class == CLASSES
    assert model.class_embedding.num_embeddings == CLASSES + 1


# -- forward -----------------------------------------------------------------------------------


def test_initial_logits_are_zero():
    model = GPT(tiny_config()).eval()
    tokens, labels = random_batch()
    logits = model(tokens, labels)
    assert logits.shape == (4, 6, VOCAB)
    assert torch.equal(logits, torch.zeros_like(logits))


def test_no_causal_leak():
    """Changing token j never changes the logits at positions ≤ j (which predict tokens ≤ j)."""
    model = tiny_model()
    tokens, labels = random_batch()
    base = model(tokens, labels)
    for j in range(tokens.shape[1]):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1) % VOCAB
        logits = model(changed, labels)
        assert torch.equal(logits[:, : j + 1], base[:, : j + 1]), j
        if j + 1 < tokens.shape[1]:
            assert not torch.allclose(logits[:, j + 1], base[:, j + 1]), j


def test_label_changes_every_position_and_prefix_forward_matches():
    model = tiny_model()
    tokens, labels = random_batch()
    full = model(tokens, labels)
    assert not torch.allclose(model(tokens, (labels + 1) % CLASSES)[:, 0], full[:, 0])
    torch.testing.assert_close(model(tokens[:, :3], labels), full[:, :3])


def test_sequence_log_prob_is_the_fp32_sum_of_token_log_probs():
    # train mode with every label dropped by forward(): sequence_log_prob must not drop them
    model = tiny_model(class_dropout=1.0, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0).train()
    tokens, labels = random_batch()
    logp = model.sequence_log_prob(tokens, labels)
    logits = model(tokens, labels, label_dropout=False)
    expected = logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1).sum(-1)
    assert logp.shape == (4,) and logp.dtype == torch.float32
    torch.testing.assert_close(logp, expected)
    assert (logp < 0).all()


def test_label_dropout_in_training_only():
    model = tiny_model(class_dropout=1.0, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    tokens, labels = random_batch()
    null = torch.full_like(labels, model.null_class)
    model.train()
    torch.testing.assert_close(model(tokens, labels), model(tokens, null))
    assert not torch.allclose(model(tokens, labels, label_dropout=False), model(tokens, null))
    model.eval()
    assert not torch.allclose(model(tokens, labels), model(tokens, null))


def test_label_dropout_rate_and_generator():
    model = tiny_model(class_dropout=0.25)
    labels = torch.zeros(4000, dtype=torch.long)
    dropped = model.drop_labels(labels, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, model.null_class}
    assert abs((dropped == model.null_class).float().mean().item() - 0.25) < 0.03
    again = model.drop_labels(labels, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)


# -- generation --------------------------------------------------------------------------------


def greedy_by_recompute(model: GPT, labels: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Greedy decoding that recomputes the whole prefix each step, without any cache."""
    tokens = torch.zeros(labels.shape[0], model.steps, dtype=torch.long)
    null = torch.full_like(labels, model.null_class)
    with torch.no_grad():
        for step in range(model.steps):
            cond = model(tokens[:, : step + 1], labels)[:, step]
            uncond = model(tokens[:, : step + 1], null)[:, step]
            tokens[:, step] = classifier_free_guidance(cond, uncond, cfg_scale).argmax(dim=-1)
    return tokens


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_kv_cached_generation_equals_recompute(cfg_scale):
    model = tiny_model()
    labels = torch.tensor([0, 1, 2, 1, 0])
    cached = model.generate(labels, cfg_scale=cfg_scale, top_k=1, generator=torch.Generator().manual_seed(0))
    assert cached.shape == (5, model.steps) and cached.dtype == torch.long
    assert torch.equal(cached, greedy_by_recompute(model, labels, cfg_scale))
    assert torch.equal(cached, model.generate(labels, cfg_scale=cfg_scale, temperature=0.0))


def test_compiled_sampling_compiles_one_step_for_the_whole_sequence_and_draws_the_same():
    """``generate(compiled=...)``: one graph for every position (the static KV cache keeps shapes
    fixed), reused by the next call, and the same tokens as eager sampling from the same seed.
    Traced with a counting backend (no Inductor code generation, which the benchmarks time)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()  # no graphs of earlier tests on the shared decode step
    counter = CompileCounter()
    model = tiny_model()
    labels = torch.arange(8) % CLASSES
    for cfg_scale in (1.0, 3.0):
        eager = model.generate(labels, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(1))
        compiled = model.generate(labels, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(1),
                                  compiled=counter)  # fmt: skip
        assert torch.equal(compiled, eager)
    again = model.generate(labels, cfg_scale=3.0, generator=torch.Generator().manual_seed(1), compiled=counter)
    assert torch.equal(again, compiled)
    # one graph per batch shape (B and the guided 2B), none per position or per call
    assert counter.frame_count == 2


def test_guidance_changes_samples_and_accepts_a_schedule():
    model = tiny_model()
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])
    plain = model.generate(labels, temperature=0.0)
    guided = model.generate(labels, cfg_scale=4.0, temperature=0.0)
    assert not torch.equal(plain, guided)
    schedule = model.generate(labels, cfg_scale=[4.0] * model.steps, temperature=0.0)
    assert torch.equal(schedule, guided)
    assert torch.equal(model.generate(labels, cfg_scale=lambda step: 4.0, temperature=0.0), guided)


def test_cfg_one_samples_from_the_conditional_model():
    """cfg_scale=1.0 draws from exactly the conditional distribution: the same draws as a sampler over
    plain conditional forward() logits with the same generator."""
    model = tiny_model()
    labels = torch.tensor([0, 1, 2, 0])
    sampled = model.generate(labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    tokens = torch.zeros_like(sampled)
    with torch.no_grad():
        for step in range(model.steps):
            probs = model(tokens[:, : step + 1], labels)[:, step].softmax(dim=-1)
            tokens[:, step] = torch.multinomial(probs, 1, generator=gen)[:, 0]
    assert torch.equal(sampled, tokens)


def test_sampling_is_reproducible_per_seed_and_restores_train_mode():
    model = tiny_model().train()
    labels = torch.arange(8) % CLASSES
    first = model.generate(labels, cfg_scale=2.0, top_p=0.9, generator=torch.Generator().manual_seed(1))
    again = model.generate(labels, cfg_scale=2.0, top_p=0.9, generator=torch.Generator().manual_seed(1))
    other = model.generate(labels, cfg_scale=2.0, top_p=0.9, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert model.training
    assert first.min() >= 0 and first.max() < VOCAB


# -- training ----------------------------------------------------------------------------------


def test_param_groups_decay_only_matmul_weights():
    model = tiny_model()
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model.num_params()
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.token_embedding.weight) in no_decay_ids
    assert id(model.class_embedding.weight) in no_decay_ids
    assert id(model.final_norm.weight) in no_decay_ids
    assert all(p.ndim == 2 for p in decay["params"])


def test_flops_per_token_formula():
    model = GPT(tiny_config())
    non_embedding = model.num_params() - (VOCAB + CLASSES + 1) * 32
    assert model.num_params(embeddings=False) == non_embedding
    assert model.flops_per_token() == 6 * non_embedding + 12 * 2 * 32 * 6


def test_tiny_model_overfits_a_fixed_set():
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=32, seq_len=16, num_classes=4, depth=2, width=64, heads=4,
        class_dropout=0.0, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0,
    )  # fmt: skip
    model = GPT(config).train()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (8, 16), generator=gen)
    labels = torch.arange(8) % 4
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = F.cross_entropy(model(tokens, labels).flatten(0, 1), tokens.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert math.isclose(losses[0], math.log(32), rel_tol=1e-5)  # zero head: uniform at start
    assert losses[-1] < 0.1 * math.log(32), losses[-1]


def test_deterministic_training_step_under_deterministic_algorithms():
    def one_step() -> torch.Tensor:
        torch.manual_seed(0)
        model = GPT(tiny_config()).train()
        tokens, labels = random_batch()
        loss = F.cross_entropy(model(tokens, labels).flatten(0, 1), tokens.flatten())
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(one_step(), one_step())
    finally:
        torch.use_deterministic_algorithms(previous)


# -- rotary positions --------------------------------------------------------------------------


def test_grid_rotation_rotates_by_row_then_column_and_leaves_the_prefix_alone():
    height, width, head_dim = 3, 4, 16
    rotation = grid_rotation((height, width), head_dim, base=100.0, prefix=1)
    assert rotation.shape == (1 + height * width, head_dim // 2)
    assert torch.equal(rotation[0], torch.ones(head_dim // 2, dtype=torch.complex64))
    angles = rotation[1:].angle().view(height, width, head_dim // 2)
    row_part, col_part = angles.split(head_dim // 4, dim=-1)
    # row pairs are constant along a row and grow with the row index; column pairs the reverse
    assert torch.allclose(row_part, row_part[:, :1].expand_as(row_part))
    assert torch.allclose(col_part, col_part[:1].expand_as(col_part))
    torch.testing.assert_close(row_part[1, 0], col_part[0, 1])
    assert row_part[1, 0, 0] == pytest.approx(1.0)  # fastest pair: 1 radian per row


def test_rotary_scores_depend_only_on_relative_grid_offsets():
    rotation = grid_rotation((4, 4), 8, base=10.0, prefix=1)[1:].view(4, 4, 4)
    q, k = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))

    def score(query_at, key_at):
        return apply_rotary(q, rotation[query_at]) @ apply_rotary(k, rotation[key_at])

    torch.testing.assert_close(score((0, 0), (1, 2)), score((2, 1), (3, 3)))
    assert not torch.allclose(score((0, 0), (1, 2)), score((0, 0), (2, 1)))


# -- shared blocks -----------------------------------------------------------------------------


def test_rms_norm_matches_reference_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    norm = RMSNorm(16).double()
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
    grad_out = torch.randn(3, 5, 16, dtype=torch.float64, generator=gen)
    ours = norm(x)
    expected = F.rms_norm(x, (16,), norm.weight, norm.eps)
    torch.testing.assert_close(ours, expected)
    ours_grads = torch.autograd.grad(ours, (x, norm.weight), grad_out)
    expected_grads = torch.autograd.grad(expected, (x, norm.weight), grad_out)
    for got, want in zip(ours_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_cached_one_token_steps_match_the_causal_forward():
    torch.manual_seed(0)
    block = TransformerBlock(32, 2, 64).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(std=0.3)
    x = torch.randn(3, 7, 32)
    rotation = grid_rotation((2, 3), 16, base=100.0, prefix=1)
    full = block(x, rotation, is_causal=True)
    cache = KVCache(3, 2, 7, 16, dtype=torch.float32)
    stepped = torch.cat([block(x[:, i : i + 1], rotation[i : i + 1], cache=cache) for i in range(7)], dim=1)
    torch.testing.assert_close(stepped, full)
    with pytest.raises(ValueError, match="holds 7 positions"):
        block(x[:, :1], rotation[:1], cache=cache)


def test_dropout_keeps_the_expected_share_scaled_up_and_is_off_in_eval():
    dropout = Dropout(0.25)
    x = torch.ones(200, 200, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert torch.allclose(y[kept], torch.tensor(1 / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient flows through kept entries only, same scale
    dropout.eval()
    assert dropout(x) is x
