"""VAR next-scale transformer: block-causal attention, KV-cached sampling, guidance, init, interface."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from models.residual_quantizer import MultiScaleResidualQuantizer
from models.sampling import classifier_free_guidance, linear_guidance_ramp, sample_tokens
from models.transformer_blocks import block_causal_mask, scale_levels
from models.var import VAR, VARConfig

VOCAB, CLASSES, EMBED, SCALES = 32, 3, 8, (1, 2, 3, 4)
SEQ_LEN = sum(side * side for side in SCALES)  # 30
BOUNDS = [0, 1, 5, 14, 30]  # scale k holds positions BOUNDS[k] : BOUNDS[k + 1]


def make_quantizer(seed: int = 0) -> MultiScaleResidualQuantizer:
    torch.manual_seed(seed)
    quantizer = MultiScaleResidualQuantizer(
        codebook_size=VOCAB, dim=EMBED, scales=SCALES, commitment_weight=0.25, quant_resi=0.5,
        share_quant_resi=4, usage_momentum=0.99, dead_code_threshold=0.1, restart_every=0,
        candidate_buffer_size=16, scale_normalization=False, normalization_momentum=0.99,
        restart_per_scale=True, restart_max_total_share=1.0,
    )  # fmt: skip
    with torch.no_grad():  # codes on a unit scale, so next-scale inputs differ visibly per token
        quantizer.codebook.weight.normal_()
    return quantizer


def tiny_config(**overrides) -> VARConfig:
    fields = dict(vocab_size=VOCAB, scales=SCALES, embed_dim=EMBED, num_classes=CLASSES, depth=2, width=32, heads=2)
    return VARConfig(**(fields | overrides))


def tiny_model(seed: int = 0, **overrides) -> VAR:
    """A tiny model with a wide init, open AdaLN gates and a full-size head, so outputs depend
    strongly on inputs, positions and the class."""
    quantizer = make_quantizer(seed)
    torch.manual_seed(seed)
    wide = {"init_std": 0.3, "init_head": 1.0, "init_adaln": 1.0, "init_adaln_gamma": 1.0, "drop_path": 0.0}
    return VAR(tiny_config(**(wide | overrides)), quantizer).eval()


def random_batch(batch: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, SEQ_LEN), generator=gen)
    labels = torch.randint(0, CLASSES, (batch,), generator=gen)
    return tokens, labels


# -- configuration -----------------------------------------------------------------------------


def test_sizes_derive_from_depth_unless_overridden():
    cfg = VARConfig(vocab_size=512, scales=(1, 2, 3, 4, 6, 8), embed_dim=16, num_classes=10, depth=4)
    assert (cfg.model_width, cfg.num_heads, cfg.head_dim, cfg.ffn_hidden) == (256, 4, 64, 1024)
    assert (cfg.seq_len, cfg.first_scale_tokens) == (130, 1)
    assert cfg.drop_path_rate == pytest.approx(0.1 * 4 / 24)
    assert cfg.weight_std == pytest.approx(math.sqrt(1 / (3 * 256)))
    small = VARConfig(vocab_size=512, scales=[1, 2], embed_dim=16, num_classes=10, depth=6, width=96, heads=3)
    assert (small.model_width, small.num_heads, small.scales) == (96, 3, (1, 2))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(scales=()), "scales"),
        (dict(width=30, heads=4), "not divisible"),
        (dict(class_dropout=1.5), "class_dropout"),
        (dict(drop_path=-0.1), "drop_path"),
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_bad_configs_fail_naming_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize("overrides", [dict(vocab_size=64), dict(embed_dim=4), dict(scales=(1, 2, 4))])
def test_a_quantizer_that_does_not_fit_the_config_is_refused(overrides):
    with pytest.raises(ValueError, match="does not match"):
        VAR(tiny_config(**overrides), make_quantizer())


def test_config_dict_round_trip_rebuilds_the_same_model():
    model = tiny_model()
    rebuilt = VAR(VARConfig(**json.loads(json.dumps(model.config_dict()))), model.quantizer).eval()
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    tokens, labels = random_batch()
    assert torch.equal(rebuilt(tokens, labels), model(tokens, labels))


def test_interface_facts():
    model = tiny_model()
    assert (model.steps, model.seq_len, model.num_classes, model.null_class) == (4, SEQ_LEN, CLASSES, CLASSES)
    assert model.class_embedding.num_embeddings == CLASSES + 1
    tokens, _ = random_batch()
    assert torch.equal(model.teacher_forcing_input(tokens), model.quantizer.teacher_forcing_input(tokens))


def test_block_causal_mask_is_full_within_a_scale_and_causal_across():
    assert scale_levels((1, 2)).tolist() == [0, 1, 1, 1, 1]
    mask = block_causal_mask((1, 2))
    assert mask[0].tolist() == [True, False, False, False, False]
    assert mask[1:].all()


def test_drop_path_rises_linearly_to_the_last_block_and_meta_construction_works():
    quantizer = make_quantizer()
    with torch.device("meta"):  # deferred init (e.g. before FSDP) builds no real tensors
        model = VAR(tiny_config(depth=3, drop_path=0.2), quantizer)
    assert model.head.weight.device.type == "meta"
    assert [block.drop_path.p for block in model.blocks] == pytest.approx([0.0, 0.1, 0.2])


# -- the frozen quantizer ----------------------------------------------------------------------


def test_quantizer_is_frozen_and_outside_the_parameters_and_state_dict():
    quantizer = make_quantizer()
    model = VAR(tiny_config(), quantizer)
    assert model.quantizer is quantizer
    assert not any(key.startswith("quantizer") or "codebook" in key for key in model.state_dict())
    quantizer_ids = {id(p) for p in quantizer.parameters()}
    assert not quantizer_ids & {id(p) for p in model.parameters()}
    assert not any(p.requires_grad for p in quantizer.parameters())
    model.train()
    assert not quantizer.training
    tokens, labels = random_batch()
    F.cross_entropy(model(tokens, labels).flatten(0, 1), tokens.flatten()).backward()
    assert all(p.grad is None for p in quantizer.parameters())


def test_to_moves_the_quantizer_device_but_keeps_it_fp32():
    model = tiny_model().double()
    assert model.head.weight.dtype == torch.float64
    assert model.quantizer.codebook.weight.dtype == torch.float32
    tokens, labels = random_batch()
    assert model(tokens, labels).dtype == torch.float64
    assert model.generate(labels, generator=torch.Generator().manual_seed(0)).shape == (4, SEQ_LEN)
    model.to("meta")  # a device move, observable without a GPU
    assert model.quantizer.codebook.weight.device.type == "meta"


# -- forward -----------------------------------------------------------------------------------


def test_untrained_model_predicts_nearly_uniform_tokens():
    torch.manual_seed(0)
    model = VAR(tiny_config(), make_quantizer()).eval()
    tokens, labels = random_batch()
    logits = model(tokens, labels)
    assert logits.shape == (4, SEQ_LEN, VOCAB)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    assert loss.item() == pytest.approx(math.log(VOCAB), abs=1e-3)


def test_no_leak_from_later_scales_and_every_next_scale_position_sees_a_changed_token():
    """Changing one token of scale k never changes the logits of scales ≤ k (they predict it and
    earlier tokens) and changes every logit of scale k+1 (full attention within a scale)."""
    model = tiny_model()
    tokens, labels = random_batch()
    base = model(tokens, labels)
    for k in range(len(SCALES)):
        for position in (BOUNDS[k], BOUNDS[k + 1] - 1):
            changed = tokens.clone()
            changed[:, position] = (changed[:, position] + 1) % VOCAB
            logits = model(changed, labels)
            assert torch.equal(logits[:, : BOUNDS[k + 1]], base[:, : BOUNDS[k + 1]]), (k, position)
            if k + 1 < len(SCALES):
                next_scale = slice(BOUNDS[k + 1], BOUNDS[k + 2])
                differs = (logits[:, next_scale] - base[:, next_scale]).abs().amax(-1) > 1e-4
                assert differs.all(), (k, position)


def test_an_input_is_seen_by_every_position_of_its_scale_and_none_before():
    """Perturbing the next-scale input at one position (first or last of scale k) changes every
    logit of scale k, earlier or later in raster order, and no logit of an earlier scale."""
    model = tiny_model()
    tokens, labels = random_batch()
    inputs = model.teacher_forcing_input(tokens)
    base = model.forward_from_inputs(inputs, labels)
    assert torch.equal(base, model(tokens, labels))
    for k in range(1, len(SCALES)):
        for position in (BOUNDS[k], BOUNDS[k + 1] - 1):
            changed = inputs.clone()
            changed[:, position - 1] += 1.0  # inputs skip the first scale's start position
            logits = model.forward_from_inputs(changed, labels)
            assert torch.equal(logits[:, : BOUNDS[k]], base[:, : BOUNDS[k]]), (k, position)
            scale = slice(BOUNDS[k], BOUNDS[k + 1])
            assert ((logits[:, scale] - base[:, scale]).abs().amax(-1) > 1e-4).all(), (k, position)


def test_label_changes_every_position():
    model = tiny_model()
    tokens, labels = random_batch()
    delta = model(tokens, (labels + 1) % CLASSES) - model(tokens, labels)
    assert (delta.abs().amax(-1) > 1e-4).all()


def test_sequence_log_prob_is_the_fp32_sum_of_token_log_probs():
    # train mode with every label dropped by forward(): sequence_log_prob must not drop them
    model = tiny_model(class_dropout=1.0).train()
    tokens, labels = random_batch()
    logp = model.sequence_log_prob(tokens, labels)
    logits = model(tokens, labels, label_dropout=False)
    expected = -F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").sum(-1)
    assert logp.shape == (4,) and logp.dtype == torch.float32
    torch.testing.assert_close(logp, expected)


def test_scale_losses_are_per_scale_means_that_weight_back_to_the_overall_mean():
    model = tiny_model()
    tokens, labels = random_batch()
    logits = model(tokens, labels)
    losses = model.scale_losses(logits, tokens)
    assert losses.shape == (len(SCALES),)
    last = F.cross_entropy(logits[:, BOUNDS[3] :].flatten(0, 1), tokens[:, BOUNDS[3] :].flatten())
    torch.testing.assert_close(losses[-1], last)
    sizes = torch.tensor([side * side for side in SCALES], dtype=torch.float32)
    overall = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    torch.testing.assert_close((losses * sizes).sum() / SEQ_LEN, overall)


def test_label_dropout_in_training_only():
    model = tiny_model(class_dropout=1.0)
    tokens, labels = random_batch()
    null = torch.full_like(labels, model.null_class)
    model.train()
    assert torch.equal(model(tokens, labels), model(tokens, null))
    assert not torch.allclose(model(tokens, labels, label_dropout=False), model(tokens, null))
    model.eval()
    assert not torch.allclose(model(tokens, labels), model(tokens, null))


def test_label_dropout_rate_and_generator():
    model = tiny_model(class_dropout=0.25)
    labels = torch.zeros(4000, dtype=torch.long)
    dropped = model.drop_labels(labels, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, model.null_class}
    assert abs((dropped == model.null_class).float().mean().item() - 0.25) < 0.03
    assert torch.equal(dropped, model.drop_labels(labels, torch.Generator().manual_seed(0)))


# -- generation --------------------------------------------------------------------------------


def sample_by_recompute(model: VAR, labels: torch.Tensor, scales: list[float], seed: int, **sampling) -> torch.Tensor:
    """Scale-by-scale sampling with full teacher-forced forwards over the prefix, no cache (later
    scales hold zeros, which the block-causal mask hides)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(labels.shape[0], SEQ_LEN, dtype=torch.long)
    null = torch.full_like(labels, model.null_class)
    guided = any(scale != 1.0 for scale in scales)
    with torch.no_grad():
        for step in range(model.steps):
            positions = slice(BOUNDS[step], BOUNDS[step + 1])
            logits = model(tokens, labels)[:, positions]
            if guided:
                logits = classifier_free_guidance(logits, model(tokens, null)[:, positions], scales[step])
            tokens[:, positions] = sample_tokens(logits, generator=gen, **sampling)
    return tokens


@pytest.mark.parametrize(
    "cfg_scale, overrides",
    [(1.0, {}), (2.0, {}), (linear_guidance_ramp(3.0, 4), {}), (2.0, {"attn_l2_norm": True})],
    ids=["guidance-free", "cfg2", "linear-ramp", "cfg2-cosine-attention"],
)
def test_kv_cached_generation_equals_recompute(cfg_scale, overrides):
    model = tiny_model(**overrides)
    labels = torch.tensor([0, 1, 2, 1, 0])
    scales = cfg_scale if isinstance(cfg_scale, list) else [cfg_scale] * model.steps
    cached = model.generate(labels, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(0))
    assert cached.shape == (5, SEQ_LEN) and cached.dtype == torch.long
    assert torch.equal(cached, sample_by_recompute(model, labels, scales, seed=0))
    greedy = model.generate(labels, cfg_scale=cfg_scale, temperature=0.0)
    assert torch.equal(greedy, sample_by_recompute(model, labels, scales, seed=0, temperature=0.0))


def test_compiled_sampling_compiles_one_graph_per_scale_once_and_draws_the_same():
    """``generate(compiled=...)``: a graph per scale (shapes differ by scale), none more on the next
    call, and the same tokens as eager sampling from the same seed. Traced with a counting backend
    (no Inductor code generation, which the benchmarks time)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()  # no graphs of earlier tests on the shared decode step
    counter = CompileCounter()
    model = tiny_model()
    labels = torch.arange(6) % CLASSES
    eager = model.generate(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
    compiled = model.generate(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(1), compiled=counter)
    assert torch.equal(compiled, eager)
    again = model.generate(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(1), compiled=counter)
    assert torch.equal(again, compiled)
    assert counter.frame_count == len(SCALES)


def test_cfg_zero_samples_from_the_null_class():
    """u + 0·(c − u) = u: guidance 0 draws what the null label draws without guidance."""
    model = tiny_model()
    labels = torch.tensor([0, 1, 2, 0])
    unconditional = model.generate(labels, cfg_scale=0.0, generator=torch.Generator().manual_seed(5))
    null = torch.full_like(labels, model.null_class)
    assert torch.equal(unconditional, model.generate(null, generator=torch.Generator().manual_seed(5)))


def test_guidance_changes_samples_and_accepts_a_schedule():
    model = tiny_model()
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])
    plain = model.generate(labels, temperature=0.0)
    guided = model.generate(labels, cfg_scale=4.0, temperature=0.0)
    assert not torch.equal(plain, guided)
    assert torch.equal(model.generate(labels, cfg_scale=[4.0] * model.steps, temperature=0.0), guided)
    assert torch.equal(model.generate(labels, cfg_scale=lambda step: 4.0, temperature=0.0), guided)
    with pytest.raises(ValueError, match="4 steps"):
        model.generate(labels, cfg_scale=[4.0] * 30)


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
    model = tiny_model(attn_l2_norm=True)
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model.num_params()
    no_decay_ids = {id(p) for p in no_decay["params"]}
    block = model.blocks[0]
    tables = (
        model.class_embedding.weight,
        model.level_embedding.weight,
        model.position_embedding,
        model.start_position,
    )
    for param in tables + (model.head.bias, block.attn.query_bias, block.attn.log_temperature):
        assert id(param) in no_decay_ids
    assert all(p.ndim == 2 for p in decay["params"])
    assert id(model.word_embed.weight) in {id(p) for p in decay["params"]}


def test_flops_per_token_formula():
    model = VAR(tiny_config(), make_quantizer())
    width, depth = 32, 2
    tables = (CLASSES + 1) * width + len(SCALES) * width + width + SEQ_LEN * width
    assert model.num_params(embeddings=False) == model.num_params() - tables
    adaln = depth * (width * 6 * width + 6 * width) + (width * 2 * width + 2 * width)
    per_token = model.num_params(embeddings=False) - adaln
    expected = 6 * per_token + 6 * adaln / SEQ_LEN + 12 * depth * width * SEQ_LEN
    assert model.flops_per_token() == pytest.approx(expected)


def test_a_few_adam_steps_fit_a_fixed_batch():
    torch.manual_seed(0)
    model = VAR(tiny_config(width=64, heads=2, class_dropout=0.0, drop_path=0.0), make_quantizer()).train()
    tokens, labels = random_batch(batch=8)
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(tokens, labels).flatten(0, 1), tokens.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=1e-3)
    assert losses[-1] < 0.2 * losses[0], losses[-1]
