"""``arpipe import``: released files (tiny LlamaGen golden weights) -> checkpoint folders that every
reader takes, and every bad input refused before anything is written."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from arpipe.cli import cli
from arpipe.released import import_released
from core.checkpoint import read_checkpoint
from core.released import ImportFailed, image_size_in_name, load_released
from models.ar import ar_from_state, tokenizer_from_state

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "released"
NAMES = [f"class {i}" for i in range(10)]  # the tiny GPT has 10 classes


def fixture(name: str) -> tuple[dict, dict]:
    with safe_open(ASSETS / f"{name}.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    released = {k.removeprefix("released/"): v.float() for k, v in tensors.items() if k.startswith("released/")}
    released.update({key: torch.zeros(shape) for key, shape in meta.get("zeros", {}).items()})
    return released, {k: v for k, v in tensors.items() if not k.startswith("released/")}


class NotATensor:
    """A class the weights-only loader must refuse to build."""


@pytest.fixture(scope="module")
def released_files(tmp_path_factory) -> dict[str, Path]:
    """The tiny golden weights saved as LlamaGen's scripts save them."""
    root = tmp_path_factory.mktemp("released")
    vq, _ = fixture("llamagen_vq")
    gpt, _ = fixture("llamagen_gpt")
    files = {"vq": root / "vq_ds2_tiny.pt", "gpt": root / "c2i_tiny_16.pt", "names": root / "names.txt"}
    # vq_train.py: {"model", "optimizer", "steps", "args"}; sample_c2i.py's fsdp files: a bare state dict
    torch.save({"model": vq, "optimizer": {}, "steps": 7, "args": argparse.Namespace(lr=1e-4)}, files["vq"])
    torch.save(gpt, files["gpt"])
    files["names"].write_text("\n".join(NAMES) + "\n")
    return files


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def imported(released_files, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("imported")
    files = released_files
    result = invoke("import", "llamagen-vq", files["vq"], "--out", out / "tok", "--image-size", 16,
                    "--class-names", files["names"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "rebuilt, not copied: quantize.codebook_used" in result.output
    result = invoke("import", "llamagen-gpt", files["gpt"], "--tokenizer", out / "tok", "--heads", 4,
                    "--out", out / "base")  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"tok": out / "tok", "base": out / "base"}


@torch.no_grad()
def test_imported_folders_load_like_trained_ones_and_compute_the_authors_outputs(imported, released_files):
    tok_state, tok_config = read_checkpoint(imported["tok"])
    state, config = read_checkpoint(imported["base"])
    # the fields train_tokenizer / pretrain write, plus where the weights came from
    for key in ("kind", "model", "token_layout", "codebook_size", "seq_len", "image_size", "class_names"):
        assert key in tok_config, key
    for key in ("arch", "model", "tokenizer_fingerprint", "token_layout", "class_names", "image_size"):
        assert key in config, key
    assert config["tokenizer_fingerprint"] == tok_config["fingerprint"]
    assert config["class_names"] == tok_config["class_names"] == NAMES
    assert tok_config["stage"] == config["stage"] == "import"
    assert tok_config["source"]["wrapper"] == "model" and tok_config["source"]["other_entries"] == [
        "args",
        "optimizer",
        "steps",
    ]
    assert config["source"]["file"] == "c2i_tiny_16.pt" and len(config["source"]["sha256"]) == 64
    tokenizer = tokenizer_from_state(tok_state, tok_config)
    model = ar_from_state(state, config, tokenizer)
    _, vq_case = fixture("llamagen_vq")
    _, gpt_case = fixture("llamagen_gpt")
    assert torch.equal(tokenizer.encode(vq_case["input/images"]), vq_case["output/indices"])
    logits = model(gpt_case["input/tokens"], gpt_case["input/labels"])
    assert (logits - gpt_case["output/logits"]).abs().max() < 1e-3


def test_arpipe_sample_draws_from_an_imported_model_with_its_imported_tokenizer(imported, tmp_path):
    out = tmp_path / "grid.png"
    result = invoke("sample", "--checkpoint", imported["base"], "--tokenizer", imported["tok"], "--classes",
                    "class 3,7", "--n", 2, "--cfg-scale", 2.0, "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0 and "4 samples" in result.output


# -- bad input: one line naming the file and the key, nothing written -----------------------------


def refused(*args: str, out: Path) -> str:
    result = invoke(*args, "--out", out)
    assert result.exit_code == 1, result.output
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    message = result.output.strip()
    assert message.startswith("Error: ") and "\n" not in message, message
    return message


def test_unreadable_files_are_refused(tmp_path, released_files):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(released_files["gpt"].read_bytes()[:5000])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    for bad in (truncated, text):
        message = refused("import", "llamagen-vq", bad, out=tmp_path / "out")
        assert str(bad) in message and "not a readable PyTorch checkpoint" in message
    code = tmp_path / "code.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": NotATensor()}, code)
    message = refused("import", "llamagen-vq", code, out=tmp_path / "out")
    assert "refused: the pickle needs more than tensors" in message and "NotATensor" in message


def test_the_wrong_format_and_a_mismatched_tokenizer_are_refused(tmp_path, released_files, imported):
    message = refused("import", "llamagen-vq", released_files["gpt"], out=tmp_path / "out")
    assert str(released_files["gpt"]) in message and "missing key 'encoder.conv_in.weight'" in message
    message = refused("import", "llamagen-gpt", released_files["vq"], "--tokenizer", imported["tok"], "--heads", 4,
                      out=tmp_path / "out")  # fmt: skip
    assert "missing key 'tok_embeddings.weight'" in message
    message = refused("import", "var", released_files["gpt"], out=tmp_path / "out")
    assert "var" in message
    # a tokenizer whose codebook is not the model's vocabulary
    wide = tmp_path / "wide"
    vq, _ = fixture("llamagen_vq")
    vq["quantize.embedding.weight"] = torch.randn(128, 8)
    torch.save({"model": vq}, tmp_path / "vq_wide.pt")
    assert invoke("import", "llamagen-vq", tmp_path / "vq_wide.pt", "--image-size", 16, "--out", wide).exit_code == 0
    message = refused("import", "llamagen-gpt", released_files["gpt"], "--tokenizer", wide, "--heads", 4,
                      out=tmp_path / "out")  # fmt: skip
    assert "'tok_embeddings.weight' holds a vocabulary of 64 tokens, the tokenizer's codebook has 128" in message


def test_a_file_named_for_another_resolution_than_the_tokenizer_is_refused(tmp_path, released_files, imported):
    renamed = tmp_path / "c2i_tiny_384.pt"
    renamed.write_bytes(released_files["gpt"].read_bytes())
    message = refused("import", "llamagen-gpt", renamed, "--tokenizer", imported["tok"], "--heads", 4,
                      out=tmp_path / "out")  # fmt: skip
    assert "the name says 384 px" in message and "--image-size 384" in message


def test_class_names_must_match_the_model(tmp_path, released_files, imported):
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    with pytest.raises(ImportFailed, match="the model has 10 classes, but 2 class names were given"):
        import_released("llamagen-gpt", released_files["gpt"], tmp_path / "out", tokenizer_dir=imported["tok"],
                        heads=4, class_names_file=names)  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_wrappers_and_prefixes_are_unwrapped(tmp_path):
    weights = {"a.weight": torch.ones(2)}
    for wrapped, wrapper in (({"module": weights}, "module"), ({"state_dict": weights, "epoch": 3}, "state_dict"),
                             ({"ema": weights, "model": {"x": 1}}, "ema"), (weights, None)):  # fmt: skip
        torch.save(wrapped, tmp_path / "w.pt")
        state, found = load_released(tmp_path / "w.pt")
        assert list(state) == ["a.weight"] and found["wrapper"] == wrapper
    torch.save({"module.a.weight": torch.ones(2)}, tmp_path / "ddp.pt")
    assert list(load_released(tmp_path / "ddp.pt")[0]) == ["a.weight"]
    torch.save({"epoch": 3}, tmp_path / "none.pt")
    with pytest.raises(ImportFailed, match="no state dict: the top-level keys are 'epoch'"):
        load_released(tmp_path / "none.pt")
    assert (
        image_size_in_name("c2i_B_384.pt"),
        image_size_in_name("c2i_XXL_256.pt"),
        image_size_in_name("vq_ds16_c2i.pt"),
    ) == (384, 256, None)


def test_var_files_import_through_the_cli_and_sample_with_vars_ramp(tmp_path):
    """The VAR formats go through the same command: VQVAE (its scale schedule named by --model),
    then the transformer paired with it; the result samples like any arpipe checkpoint."""
    from models.released.var_layout import random_released, var_layout, vqvae_layout

    scales = (1, 2, 3, 4)
    vqvae = random_released(vqvae_layout(ch=32, ch_mult=(1, 2), res_blocks=1, z=8, vocab=64, scales=4), scales)
    var = random_released(var_layout(depth=2, width=32, vocab=64, z=8, classes=10, scales=scales), scales, seed=1)
    torch.save(vqvae, tmp_path / "vae_tiny.pth")
    torch.save(var, tmp_path / "var_d2.pth")
    tok, base = tmp_path / "var-tok", tmp_path / "var-base"
    names = tmp_path / "classes.txt"
    names.write_text("".join(f"class {i}\n" for i in range(10)))
    result = invoke("import", "var-vqvae", tmp_path / "vae_tiny.pth", "--model", "1_2_3_4", "--class-names", names,
                    "--out", tok)  # fmt: skip
    assert result.exit_code == 0, result.output
    result = invoke("import", "var", tmp_path / "var_d2.pth", "--model", "d2", "--tokenizer", tok, "--out", base)
    assert result.exit_code == 0, result.output
    _, config = read_checkpoint(base)
    assert config["arch"] == "var" and config["token_layout"] == {"kind": "msvq", "scales": [1, 2, 3, 4]}
    message = refused("import", "var", tmp_path / "var_d2.pth", "--model", "d2", "--tokenizer", tok, "--heads", 4,
                      out=tmp_path / "out")  # fmt: skip
    assert "heads = depth" in message
    out = tmp_path / "grid.png"
    result = invoke("sample", "--checkpoint", base, "--tokenizer", tok, "--classes", "class 1,class 2", "--n", 2,
                    "--cfg-scale", 2.5,
                    "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0


def test_arpipe_sample_writes_an_adm_sample_batch(imported, tmp_path):
    """`--npz`: --n samples in total, uint8 NHWC arr_0 with the labels in arr_1, drawn batch by batch
    (batches of the same class still differ: each batch has its own seed, as in one long run)."""
    import numpy as np

    out = tmp_path / "samples.npz"
    result = invoke("sample", "--checkpoint", imported["base"], "--tokenizer", imported["tok"], "--classes", "class 3",
                    "--npz", out, "--n", 8, "--batch", 4, "--cfg-scale", 2.0)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "8 samples of 1 classes as an ADM sample batch" in result.output
    with np.load(out) as batch:
        images, labels = batch["arr_0"], batch["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (8, 16, 16, 3) and set(labels) == {3}
    assert not np.array_equal(images[:4], images[4:])
    assert not out.with_name(out.name + ".partial").exists()
    again = tmp_path / "again.npz"
    invoke("sample", "--checkpoint", imported["base"], "--tokenizer", imported["tok"], "--classes", "class 3",
           "--npz", again, "--n", 8, "--batch", 4, "--cfg-scale", 2.0)  # fmt: skip
    with np.load(again) as batch:
        assert np.array_equal(batch["arr_0"], images)  # deterministic
