"""VAR's released checkpoints (models/released/var.py): parity with the authors' code on golden
fixtures, round trips in the released layouts at a tiny size, the official sizes by shape, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from models.ar import ar_from_state, build_ar, tokenizer_from_state
from models.released import ReleasedFormatError, converter
from models.released.var import PATCH_NUMS, convert_var, convert_vqvae
from models.released.var_layout import random_released, var_layout, vqvae_layout
from models.sampling import classifier_free_guidance, family_filters, guidance_per_step, linear_guidance_ramp
from models.sar import guided_rollout_logits
from models.tokenizers import build_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "released"


TINY_SCALES = (1, 2, 3, 4)
TINY_VQVAE = dict(ch=32, ch_mult=(1, 2), res_blocks=1, z=8, vocab=64, scales=4, phis=4)
TINY_VAR = dict(depth=2, width=32, vocab=64, z=8, classes=10, scales=TINY_SCALES)


def tiny_pair(seed: int = 0):
    tok = convert_vqvae(random_released(vqvae_layout(**TINY_VQVAE), TINY_SCALES, seed=seed), model="1_2_3_4")
    var = convert_var(
        random_released(var_layout(**TINY_VAR), TINY_SCALES, seed=seed + 1), model="d2", tokenizer=tok.config
    )
    return tok, var


# -- parity with the authors' code (fixtures from benchmarks/parity_released_var.py) ------------


def load_fixture(name: str) -> tuple[dict, dict, dict]:
    with safe_open(str(ASSETS / name), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    weights = {k.removeprefix("released."): v for k, v in tensors.items() if k.startswith("released.")}
    weights = {k: v.float() if v.dtype == torch.float16 else v for k, v in weights.items()}
    return weights, {k: v for k, v in tensors.items() if not k.startswith("released.")}, meta


def test_golden_fixtures_are_the_layouts_this_file_builds():
    vqvae, _, _ = load_fixture("var_vqvae.safetensors")
    var, _, _ = load_fixture("var_var.safetensors")
    assert {k: tuple(v.shape) for k, v in vqvae.items()} == vqvae_layout(**TINY_VQVAE)
    assert {k: tuple(v.shape) for k, v in var.items()} == var_layout(**TINY_VAR)


def test_imported_models_compute_what_the_authors_code_computes():
    vqvae, data, meta = load_fixture("var_vqvae.safetensors")
    tok = convert_vqvae(vqvae, model=meta["scales"])
    tokenizer = tokenizer_from_state(tok.state_dict, tok.config)
    var, var_data, _ = load_fixture("var_var.safetensors")
    converted = convert_var(var, model=meta["model"], tokenizer=tok.config)
    model = ar_from_state(converted.state_dict, converted.config, tokenizer)
    sampling = json.loads(meta["sampling"])
    with torch.no_grad():
        indices = tokenizer.encode(data["in.images"])
        assert torch.equal(indices, data["out.indices"])  # every scale's VQ indices
        assert (tokenizer.decode(indices) - data["out.recon"]).abs().max() < 1e-3
        logits = model(var_data["in.tokens"], var_data["in.labels"], label_dropout=False)
        assert (logits - var_data["out.logits"]).abs().max() < 1e-3
        # VAR's sampler at cfg 1.5 (its ramp t = 1.5·k/(K−1)) is ours at linear_guidance_ramp(2.5)
        tokens = model.generate(
            var_data["in.sample_labels"], cfg_scale=linear_guidance_ramp(1 + sampling["cfg"], model.steps),
            top_k=sampling["top_k"], top_p=sampling["top_p"],
            generator=torch.Generator().manual_seed(sampling["seed"]),
        )  # fmt: skip
        assert ((tokenizer.decode(tokens) + 1) / 2 - var_data["out.sampled"]).abs().max() < 1e-3
    assert set(converted.rebuilt) == {"lvl_1L", "attn_bias_for_masking"} | {
        f"blocks.{i}.attn.zero_k_bias" for i in range(2)
    }


# -- round trips and official sizes -----------------------------------------------------------


def test_tiny_round_trip_loads_strictly_and_runs():
    tok, var = tiny_pair()
    assert converter("var-vqvae") is convert_vqvae and converter("var") is convert_var
    tokenizer = tokenizer_from_state(tok.state_dict, tok.config)
    model = ar_from_state(var.state_dict, var.config, tokenizer)
    assert tok.config["token_layout"] == {"kind": "msvq", "scales": [1, 2, 3, 4]}
    assert (tok.config["seq_len"], tok.config["image_size"], tok.config["codebook_size"]) == (30, 8, 64)
    assert tok.config["model"]["scale_normalization"] is False and tok.config["model"]["norm_groups"] == 32
    assert var.config["model"]["attn_l2_norm"] and var.config["model"]["num_classes"] == 10
    assert model.config.num_heads == 2 and model.config.model_width == 32
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        tokens = tokenizer.encode(images)
        assert tokenizer.decode(tokens).shape == images.shape
        assert model(tokens, torch.tensor([0, 10]), label_dropout=False).shape == (2, 30, 64)
    assert json.loads(json.dumps(tok.config)) == tok.config and json.loads(json.dumps(var.config)) == var.config


@pytest.mark.parametrize("resolution", [None, "512"])
def test_official_vqvae_by_shape(resolution):
    scales = PATCH_NUMS[resolution or "256"]
    tok = convert_vqvae(random_released(vqvae_layout(), scales, device="meta"), model=resolution)
    assert tok.config["model"]["channel_multipliers"] == [1, 1, 2, 2, 4] and tok.config["model"]["base_channels"] == 160
    assert tok.config["seq_len"] == sum(s * s for s in scales) and tok.config["image_size"] == 16 * scales[-1]
    with torch.device("meta"):
        expected = build_tokenizer("msvq", tok.config["model"]).state_dict()
    assert {k: tuple(v.shape) for k, v in tok.state_dict.items()} == {k: tuple(v.shape) for k, v in expected.items()}


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_official_var_by_shape(depth):
    scales = PATCH_NUMS["256"]
    tok = convert_vqvae(random_released(vqvae_layout(), scales, device="meta"))
    var = convert_var(
        random_released(var_layout(depth=depth), scales, device="meta"), model=f"d{depth}", tokenizer=tok.config
    )
    assert var.config["model"]["width"] is None and var.config["model"]["depth"] == depth  # 64·depth, depth heads
    with torch.device("meta"):
        quantizer = build_tokenizer("msvq", tok.config["model"]).quantizer
        expected = build_ar("var", var.config["model"], quantizer).state_dict()
    assert {k: tuple(v.shape) for k, v in var.state_dict.items()} == {k: tuple(v.shape) for k, v in expected.items()}


# -- bad input: each fails naming the key --------------------------------------------------------


def tiny_released():
    return (
        random_released(vqvae_layout(**TINY_VQVAE), TINY_SCALES),
        random_released(var_layout(**TINY_VAR), TINY_SCALES, seed=1),
        tiny_pair()[0].config,
    )


def llamagen_gpt_keys() -> dict[str, torch.Tensor]:
    """A few keys of LlamaGen's GPT (autoregressive/models/gpt.py)."""
    return {
        "tok_embeddings.weight": torch.zeros(16384, 8),
        "cls_embedding.embedding_table.weight": torch.zeros(1001, 8),
        "layers.0.attention.wqkv.weight": torch.zeros(24, 8),
        "norm.weight": torch.zeros(8),
        "output.weight": torch.zeros(16384, 8),
    }


@pytest.mark.parametrize(
    "case, key",
    [
        ("vqvae missing", "decoder.up.1.upsample.conv.weight"),
        ("vqvae unexpected", "quantize.extra"),
        ("vqvae misshaped", "quantize.embedding.weight"),
        ("vqvae not a tensor", "quant_conv.bias"),
        ("var missing", "blocks.1.ffn.fc2.bias"),
        ("var unexpected", "blocks.0.attn.extra"),
        ("var misshaped", "pos_1LC"),
        ("var heads", "blocks.0.attn.scale_mul_1H11"),
        ("var mask", "attn_bias_for_masking"),
        ("var zero k bias", "blocks.1.attn.zero_k_bias"),
        ("var depth", "blocks.1"),
        ("gpt as var", "class_emb.weight"),
        ("vqvae as var", "class_emb.weight"),
        ("var as vqvae", "encoder.conv_in.weight"),
        ("codebook", "head.weight"),
        ("code width", "word_embed.weight"),
    ],
)
def test_bad_input_is_refused_naming_the_key(case, key):
    vqvae, var, tok_config = tiny_released()
    run_var = lambda sd, model="d2", tok=tok_config: convert_var(sd, model=model, tokenizer=tok)  # noqa: E731
    attempts = {
        "vqvae missing": lambda: convert_vqvae({k: v for k, v in vqvae.items() if k != key}, model="1_2_3_4"),
        "vqvae unexpected": lambda: convert_vqvae(vqvae | {key: torch.zeros(1)}, model="1_2_3_4"),
        "vqvae misshaped": lambda: convert_vqvae(vqvae | {key: torch.zeros(64, 9)}, model="1_2_3_4"),
        "vqvae not a tensor": lambda: convert_vqvae(vqvae | {key: [0.0]}, model="1_2_3_4"),
        "var missing": lambda: run_var({k: v for k, v in var.items() if k != key}),
        "var unexpected": lambda: run_var(var | {key: torch.zeros(1)}),
        "var misshaped": lambda: run_var(var | {key: torch.zeros(1, 29, 32)}),
        "var heads": lambda: run_var(var | {key: torch.zeros(1, 4, 1, 1)}),
        "var mask": lambda: run_var(var | {key: torch.zeros(1, 1, 30, 30)}),  # no causal structure
        "var zero k bias": lambda: run_var(var | {key: torch.ones(32)}),
        "var depth": lambda: run_var(var, model="d4"),
        "gpt as var": lambda: run_var(llamagen_gpt_keys()),
        "vqvae as var": lambda: run_var(vqvae),
        "var as vqvae": lambda: convert_vqvae(var),
        "codebook": lambda: run_var(var, tok=tok_config | {"codebook_size": 4096}),
        "code width": lambda: run_var(var, tok=tok_config | {"model": tok_config["model"] | {"z_channels": 32}}),
    }
    with pytest.raises(ReleasedFormatError, match=key.replace(".", r"\.")):
        attempts[case]()


def test_wrong_format_names_what_the_file_looks_like():
    vqvae, var, tok_config = tiny_released()
    with pytest.raises(ReleasedFormatError, match="looks like a llamagen-gpt"):
        convert_var(llamagen_gpt_keys(), model="d2", tokenizer=tok_config)
    with pytest.raises(ReleasedFormatError, match="looks like a var-vqvae"):
        convert_var(vqvae, model="d2", tokenizer=tok_config)
    with pytest.raises(ReleasedFormatError, match="looks like a var checkpoint"):
        convert_vqvae(var)
    with pytest.raises(ReleasedFormatError, match="unknown model"):
        convert_var(var, model="VAR-16", tokenizer=tok_config)
    with pytest.raises(ReleasedFormatError, match="msvq"):
        convert_var(var, model="d2", tokenizer=tok_config | {"kind": "vq"})


def test_usage_monitor_of_another_schedule_is_rebuilt_and_listed():
    vqvae, _, _ = tiny_released()
    tok = convert_vqvae(vqvae, model="1_2_4")  # 3 scales, the monitor has 4 rows
    assert tok.rebuilt == ("quantize.ema_vocab_hit_SV",)
    assert not tok.state_dict["quantizer.usage.hits_ema_KV"].any()
    assert torch.equal(convert_vqvae(vqvae, model="1_2_3_4").state_dict["quantizer.usage.hits_ema_KV"],
                       vqvae["quantize.ema_vocab_hit_SV"])  # fmt: skip


# -- each family samples the way its authors do (models/sampling.py) -----------------------------


def test_guidance_schedule_is_vars_ramp_for_var_and_constant_for_gpt():
    # VAR's cfg x: t = x·k/(K−1), logits (1 + t)·c − t·u; ours: u + s_k·(c − u) with s = ramp to 1 + x
    ramp = guidance_per_step(2.5, "auto", arch="var", steps=10)
    assert ramp == linear_guidance_ramp(2.5, 10) and ramp[0] == 1.0 and ramp[-1] == 2.5
    cond, uncond = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))
    for k, scale in enumerate(ramp):
        t = 1.5 * k / 9
        assert torch.allclose(classifier_free_guidance(cond, uncond, scale), (1 + t) * cond - t * uncond, atol=1e-6)
    # gpt (and any guidance-free run) keeps a plain float: generate's constant path, unchanged
    assert guidance_per_step(2.0, "auto", arch="gpt", steps=256) == 2.0
    assert guidance_per_step(1.0, "linear", arch="gpt", steps=256) == 1.0
    assert guidance_per_step(2.0, "constant", arch="var", steps=10) == 2.0
    assert guidance_per_step(2.0, "linear", arch="gpt", steps=3) == [1.0, 1.5, 2.0]
    with pytest.raises(ValueError, match="guidance schedule"):
        guidance_per_step(2.0, "cosine", arch="var", steps=10)
    # the authors' filters: VAR 900 (capped at the vocabulary) / 0.96, LlamaGen off; explicit values kept
    assert family_filters("auto", "auto", arch="var", vocab_size=4096) == (900, 0.96)
    assert family_filters("auto", "auto", arch="var", vocab_size=64) == (64, 0.96)
    assert family_filters("auto", "auto", arch="gpt", vocab_size=16384) == (0, 1.0)
    assert family_filters(5, 0.5, arch="var", vocab_size=64) == (5, 0.5)


def test_imported_var_samples_with_the_ramp():
    tok, var = tiny_pair()
    tokenizer = tokenizer_from_state(tok.state_dict, tok.config)
    model = ar_from_state(var.state_dict, var.config, tokenizer)
    labels = torch.tensor([0, 5, 9])

    def sample(cfg_scale):
        generator = torch.Generator().manual_seed(3)
        return model.generate(labels, cfg_scale=cfg_scale, top_k=32, top_p=0.9, generator=generator)

    ramped = sample(guidance_per_step(4.0, "auto", arch="var", steps=model.steps))
    assert torch.equal(ramped, sample([1.0, 2.0, 3.0, 4.0]))
    # the first scale is guidance-free under the ramp, so it matches the unguided draw there
    assert torch.equal(ramped[:, :1], sample(1.0)[:, :1])
    assert not torch.equal(ramped, sample(4.0))


def test_sar_rollout_guidance_schedules():
    cond, uncond = torch.randn(2, 1, 30, 8, generator=torch.Generator().manual_seed(0))
    levels = [0] + [1] * 4 + [2] * 9 + [3] * 16
    ramps = {"sar": lambda k: 0.6 * (1 + k / 3), "linear": lambda k: 1.2 * k / 3, "constant": lambda k: 1.2}
    for schedule, t_of in ramps.items():
        guided = guided_rollout_logits(cond, uncond, TINY_SCALES, 1.2, schedule)
        t_L1 = torch.tensor([t_of(k) for k in levels])[:, None]
        assert torch.allclose(guided, (1 + t_L1) * cond - t_L1 * uncond, atol=1e-5), schedule


@pytest.mark.parametrize("share", [0, 1])
def test_non_shared_and_fully_shared_phi_layouts(share):
    """VAR's share_quant_resi 0 (PhiNonShared: ``quant_resi.k``) and 1 (PhiShared: ``quant_resi.qresi``)."""
    vqvae, _, _ = tiny_released()
    phis = {k: v for k, v in vqvae.items() if ".qresi_ls." in k}
    rest = {k: v for k, v in vqvae.items() if k not in phis}
    if share == 0:
        renamed = {k.replace("qresi_ls.", ""): v for k, v in phis.items()}
    else:
        renamed = {k.replace("qresi_ls.0", "qresi"): v for k, v in phis.items() if ".qresi_ls.0." in k}
    tok = convert_vqvae(rest | renamed, model="1_2_3_4")
    assert tok.config["model"]["share_quant_resi"] == share
    tokenizer = tokenizer_from_state(tok.state_dict, tok.config)
    assert len(tokenizer.quantizer.phis) == (4 if share == 0 else 1)
    source = "quantize.quant_resi.3.weight" if share == 0 else "quantize.quant_resi.qresi.weight"
    assert torch.equal(tokenizer.quantizer.phis[-1].conv.weight, renamed[source])
