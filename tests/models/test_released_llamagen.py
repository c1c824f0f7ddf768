"""LlamaGen's released formats: parity with the authors' outputs, official shapes, bad input.

Golden files (``tests/assets/released/``, written by ``benchmarks/parity_released.py
--write-fixtures`` from the authors' own modules): tiny random weights in the released layout, a
fixed input and what the authors' code computed from it; ``llamagen_shapes.json``: key -> shape
of every official released layout, from the authors' constructors on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from models.ar import ar_from_state, tokenizer_from_state
from models.gpt import GPT, GPTConfig
from models.released import ReleasedFormatError, converter
from models.released.llamagen import GPT_MODELS, convert_gpt, convert_vq

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "released"
TOLERANCE = 1e-3


def load_fixture(name: str) -> tuple[dict, dict, dict]:
    """(released state dict in fp32, the authors' inputs and outputs, metadata)."""
    with safe_open(ASSETS / f"{name}.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    released = {k.removeprefix("released/"): v.float() for k, v in tensors.items() if k.startswith("released/")}
    released.update({key: torch.zeros(shape) for key, shape in meta.pop("zeros", {}).items()})
    case = {k: v for k, v in tensors.items() if not k.startswith("released/")}
    return released, case, meta


def tokenizer_config(side: int, codebook_size: int = 64, image_size: int | None = None) -> dict:
    """The parts of an imported tokenizer's config.json that the GPT converter reads."""
    return {"kind": "vq", "token_layout": {"kind": "vq", "grid": [side, side]}, "codebook_size": codebook_size,
            "seq_len": side * side, "image_size": image_size or 16 * side}  # fmt: skip


@pytest.fixture(scope="module")
def vq_fixture():
    return load_fixture("llamagen_vq")


@pytest.fixture(scope="module")
def gpt_fixture():
    return load_fixture("llamagen_gpt")


# -- parity with the authors' code ----------------------------------------------------------------


@torch.no_grad()
def test_vq_encodes_to_the_authors_indices_and_decodes_within_1e_3(vq_fixture):
    released, case, meta = vq_fixture
    converted = convert_vq(released, image_size=meta["image_size"])
    assert converted.rebuilt == ("quantize.codebook_used",)
    tokenizer = tokenizer_from_state(converted.state_dict, converted.config)
    assert torch.equal(tokenizer.encode(case["input/images"]), case["output/indices"])
    side = converted.config["token_layout"]["grid"][0]
    decoded = tokenizer.decode_latent(tokenizer.quantizer.lookup(case["output/indices"], side, side))
    assert (decoded - case["output/decoded"]).abs().max() < TOLERANCE
    clamped = tokenizer.decode(case["output/indices"])
    assert (clamped - case["output/decoded"].clamp(-1, 1)).abs().max() < TOLERANCE


def gpt_from_fixture(gpt_fixture, **overrides) -> GPT:
    released, _, meta = gpt_fixture
    converted = convert_gpt(released, tokenizer=tokenizer_config(meta["grid"]), heads=meta["heads"])
    return ar_from_state(
        converted.state_dict, {**converted.config, "model": {**converted.config["model"], **overrides}}, None
    )


@torch.no_grad()
def test_gpt_teacher_forced_logits_and_greedy_samples_match_the_authors(gpt_fixture):
    _, case, _ = gpt_fixture
    model = gpt_from_fixture(gpt_fixture)
    logits = model(case["input/tokens"], case["input/labels"])
    assert (logits - case["output/logits"]).abs().max() < TOLERANCE
    # their KV-cached generate, greedy: the class token's zero rotation holds in our cache too
    real_labels = case["input/labels"][:-1]
    assert torch.equal(model.generate(real_labels, temperature=0.0), case["output/greedy"])
    assert torch.equal(model.generate(real_labels, cfg_scale=2.0, temperature=0.0), case["output/greedy_cfg2"])


@torch.no_grad()
def test_the_identity_prefix_rotation_would_not_match(gpt_fixture):
    """The option is needed: with today's default (class token not rotated) the logits differ."""
    _, case, _ = gpt_fixture
    model = gpt_from_fixture(gpt_fixture, prefix_rotation="identity")
    assert (model(case["input/tokens"], case["input/labels"]) - case["output/logits"]).abs().max() > 1e-2


def test_prefix_rotation_is_left_out_of_config_dict_at_its_default():
    """Configs (and so fingerprints) of models that do not use the option are unchanged."""
    config = GPTConfig(vocab_size=16, seq_len=4, num_classes=2, depth=1, width=16, heads=2)
    assert "prefix_rotation" not in GPT(config).config_dict()
    zero = GPT(GPTConfig(**{**GPT(config).config_dict(), "prefix_rotation": "zero"}))
    assert zero.config_dict()["prefix_rotation"] == "zero"
    with pytest.raises(ValueError, match="prefix_rotation"):
        GPTConfig(vocab_size=16, seq_len=4, num_classes=2, depth=1, width=16, heads=2, prefix_rotation="ones")


# -- official sizes, shapes only ------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_shapes() -> dict[str, dict[str, list[int]]]:
    return json.loads((ASSETS / "llamagen_shapes.json").read_text())


def meta_tensors(table: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in table.items()}


@pytest.mark.parametrize(("name", "multipliers"), [("VQ-16", [1, 1, 2, 2, 4]), ("VQ-8", [1, 2, 2, 4])])
@pytest.mark.parametrize("image_size", [256, 384])
def test_official_vq_layouts_convert_with_sizes_from_shapes(official_shapes, name, multipliers, image_size):
    converted = convert_vq(meta_tensors(official_shapes[name]), model=name, image_size=image_size)
    model = converted.config["model"]
    assert (model["base_channels"], model["channel_multipliers"], model["res_blocks"]) == (128, multipliers, 2)
    assert (model["z_channels"], model["codebook_size"], model["codebook_dim"], model["norm_groups"]) == (
        256,
        16384,
        8,
        32,
    )
    side = image_size // 2 ** (len(multipliers) - 1)
    assert converted.config["token_layout"]["grid"] == [side, side]
    assert converted.config["seq_len"] == side * side


@pytest.mark.parametrize("name", ["GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B"])
@pytest.mark.parametrize("side", [16, 24])  # 256 and 384 px through VQ-16
def test_official_gpt_layouts_convert_with_sizes_from_shapes(official_shapes, name, side):
    released = meta_tensors(official_shapes[name])
    converted = convert_gpt(released, model=name, tokenizer=tokenizer_config(side, 16384, 16 * side))
    model = converted.config["model"]
    depth, width, heads = GPT_MODELS[name]
    assert (model["depth"], model["width"], model["heads"], model["vocab_size"]) == (depth, width, heads, 16384)
    assert (model["num_classes"], model["seq_len"], model["grid"]) == (1000, side * side, [side, side])
    assert model["prefix_rotation"] == "zero" and model["multiple_of"] == 256
    hidden = official_shapes[name]["layers.0.feed_forward.w1.weight"][0]
    assert converted.state_dict["blocks.0.ffn.gate_up.weight"].shape == (2 * hidden, width)
    # a file that also holds the rotary table (older saves) converts the same, the table rebuilt
    with_table = {**released, "freqs_cis": torch.empty(1 + side * side, width // heads // 2, 2, device="meta")}
    assert convert_gpt(with_table, model=name, tokenizer=tokenizer_config(side, 16384)).rebuilt == ("freqs_cis",)


# -- bad input: each fails naming the key ---------------------------------------------------------


def test_missing_unexpected_and_misshaped_keys_are_named(gpt_fixture, vq_fixture):
    released, _, meta = gpt_fixture
    tokenizer, heads = tokenizer_config(meta["grid"]), meta["heads"]
    missing = {k: v for k, v in released.items() if k != "layers.1.feed_forward.w3.weight"}
    with pytest.raises(ReleasedFormatError, match=r"missing key 'layers\.1\.feed_forward\.w3\.weight'"):
        convert_gpt(missing, tokenizer=tokenizer, heads=heads)
    with pytest.raises(ReleasedFormatError, match="unexpected key 'layers.0.attention.extra'"):
        convert_gpt({**released, "layers.0.attention.extra": torch.zeros(2)}, tokenizer=tokenizer, heads=heads)
    misshaped = {**released, "layers.1.attention.wo.weight": torch.zeros(64, 32)}
    with pytest.raises(ReleasedFormatError, match=r"key 'layers\.1\.attention\.wo\.weight' has shape \(64, 32\)"):
        convert_gpt(misshaped, tokenizer=tokenizer, heads=heads)
    vq_released, _, vq_meta = vq_fixture
    misshaped = {**vq_released, "decoder.mid.1.k.weight": torch.zeros(32, 32, 3, 3)}
    with pytest.raises(ReleasedFormatError, match=r"'decoder\.mid\.1\.k\.weight' has shape \(32, 32, 3, 3\)"):
        convert_vq(misshaped, image_size=vq_meta["image_size"])
    with pytest.raises(ReleasedFormatError, match="holds a str, not a tensor"):
        convert_vq({**vq_released, "note": "hello"})


def test_the_wrong_format_for_the_file_is_named(gpt_fixture, vq_fixture):
    gpt_released, _, meta = gpt_fixture
    vq_released, _, _ = vq_fixture
    with pytest.raises(ReleasedFormatError, match="llamagen-vq: missing key 'encoder.conv_in.weight'"):
        converter("llamagen-vq")(gpt_released)
    with pytest.raises(ReleasedFormatError, match="llamagen-gpt: missing key 'tok_embeddings.weight'"):
        converter("llamagen-gpt")(vq_released, tokenizer=tokenizer_config(8), heads=4)
    var_like = {"class_emb.weight": torch.zeros(11, 64), "word_embed.weight": torch.zeros(64, 32),
                "blocks.0.attn.mat_qkv.weight": torch.zeros(192, 64)}  # fmt: skip
    with pytest.raises(ReleasedFormatError, match="llamagen-gpt: missing key 'tok_embeddings.weight'"):
        converter("llamagen-gpt")(var_like, tokenizer=tokenizer_config(8), heads=4)
    with pytest.raises(ReleasedFormatError, match="unknown released format 'llamagen'"):
        converter("llamagen")


def test_model_name_heads_and_tokenizer_are_checked(gpt_fixture, official_shapes):
    released, _, meta = gpt_fixture
    with pytest.raises(ReleasedFormatError, match="heads are in no tensor"):
        convert_gpt(released, tokenizer=tokenizer_config(meta["grid"]))
    with pytest.raises(ReleasedFormatError, match="needs the config.json of its imported tokenizer"):
        convert_gpt(released, heads=4)
    with pytest.raises(ReleasedFormatError, match="vocabulary of 64 tokens, the tokenizer's codebook has 16384"):
        convert_gpt(released, tokenizer=tokenizer_config(meta["grid"], 16384), heads=4)
    gpt_b = meta_tensors(official_shapes["GPT-B"])
    with pytest.raises(
        ReleasedFormatError, match=r"GPT-L has 24 layers of width 1024, the file 12 of width 768 \(that is GPT-B\)"
    ):
        convert_gpt(gpt_b, model="GPT-L", tokenizer=tokenizer_config(16, 16384))
    with pytest.raises(ReleasedFormatError, match="GPT-B has 12 heads, not 8"):
        convert_gpt(gpt_b, model="GPT-B", heads=8, tokenizer=tokenizer_config(16, 16384))
    with pytest.raises(ReleasedFormatError, match=r"'freqs_cis' has shape \(257, 32, 2\), expected \(577, 32, 2\)"):
        table = {**gpt_b, "freqs_cis": torch.empty(257, 32, 2, device="meta")}
        convert_gpt(table, model="GPT-B", tokenizer=tokenizer_config(24, 16384))
    vq16 = meta_tensors(official_shapes["VQ-16"])
    with pytest.raises(
        ReleasedFormatError, match=r"VQ-8 has channel multipliers \(1, 2, 2, 4\), the file \(1, 1, 2, 2, 4\)"
    ):
        convert_vq(vq16, model="VQ-8")
    with pytest.raises(
        ReleasedFormatError, match="llamagen-vq: config key 'image_size' must be a multiple of the downsample factor 16"
    ):
        convert_vq(vq16, image_size=250)
