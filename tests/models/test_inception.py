"""Inception-space features through torch-fidelity: shapes, determinism, metrics, clear errors."""

import socket

import numpy as np
import pytest
import torch
from inception_weights import needs_torch_fidelity, write_random_inception_weights

from models.inception import FEATURE_DIM, embed_inception, load_inception
from models.metrics import fid_from_features

pytestmark = needs_torch_fidelity


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def digits_like(count: int, seed: int) -> np.ndarray:
    """uint8 RGB 8x8 images: bright strokes on black, like the embedded digits."""
    rng = np.random.default_rng(seed)
    gray = (rng.random((count, 8, 8)) < 0.3) * rng.integers(128, 256, (count, 8, 8))
    return np.repeat(gray[..., None], 3, axis=3).astype(np.uint8)


def test_features_and_logits_are_deterministic_and_give_fid_zero_against_themselves(weights, no_network):
    extractor = load_inception(weights)
    images = digits_like(6, seed=0)
    features, logits = embed_inception(extractor, images, batch_size=4)
    assert features.shape == (6, FEATURE_DIM) and logits.shape == (6, 1008)
    assert features.dtype == np.float64 and np.isfinite(features).all() and features.std() > 1e-3
    again, _ = embed_inception(extractor, images, batch_size=6)  # batching does not change features
    np.testing.assert_allclose(again, features, rtol=1e-5, atol=1e-6)
    assert fid_from_features(features, features) == pytest.approx(0, abs=1e-6)
    # a distribution shift (inverted images) moves the features away
    shifted, _ = embed_inception(extractor, 255 - images)
    assert fid_from_features(shifted, features) > 10 * fid_from_features(again, features) + 1e-3


def test_weights_load_as_the_published_file_format(weights):
    state = torch.load(weights, weights_only=True)
    assert type(state) is dict and not any(key.endswith("num_batches_tracked") for key in state)
    assert "Mixed_7c.branch_pool.conv.weight" in state and state["fc.weight"].shape == (1008, 2048)
    # a float32 network in eval mode whose weights are exactly the file's
    extractor = load_inception(weights)
    assert not extractor.training
    torch.testing.assert_close(extractor.state_dict()["fc.weight"], state["fc.weight"])


def test_missing_corrupt_or_foreign_weights_fail_naming_the_file(tmp_path, no_network):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*not found.*nothing is downloaded"):
        load_inception(missing)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file" * 100)
    with pytest.raises(ValueError, match=f"{corrupt} are not a readable torch state dict"):
        load_inception(corrupt)
    foreign = tmp_path / "foreign.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), foreign)
    with pytest.raises(ValueError, match=f"{foreign} do not fit torch-fidelity's InceptionV3"):
        load_inception(foreign)
    pickled = tmp_path / "pickled.pth"
    torch.save({"weights": [1, 2, 3]}, pickled)
    with pytest.raises(ValueError, match=f"{pickled} must hold a state dict of tensors"):
        load_inception(pickled)


def test_images_must_be_uint8_rgb(weights):
    extractor = load_inception(weights)
    with pytest.raises(ValueError, match="expected uint8 RGB images"):
        embed_inception(extractor, np.zeros((2, 8, 8, 3), dtype=np.float32))
