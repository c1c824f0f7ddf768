"""The evaluation classifier: shapes, config round trip, determinism, batched embedding."""

import numpy as np
import pytest
import torch

from models.evalnet import EvalNet, EvalNetConfig, build_evalnet, embed_images, images_to_input

TINY = {"image_size": 8, "channels": [8, 16], "feature_dim": 12, "num_classes": 5}


def tiny_net(seed: int = 0, **overrides) -> EvalNet:
    torch.manual_seed(seed)
    return build_evalnet({**TINY, **overrides})


@pytest.mark.parametrize("side", [8, 16, 12])
def test_features_and_logits_have_the_documented_shapes(side):
    model = tiny_net()
    x_BCHW = torch.rand(3, 3, side, side) * 2 - 1  # other sizes go through the global pool
    features_BD, logits_BC = model.features(x_BCHW)
    assert features_BD.shape == (3, 12) and logits_BC.shape == (3, 5)
    assert torch.equal(model(x_BCHW), logits_BC)


def test_default_config_is_the_documented_one():
    model = EvalNet(EvalNetConfig())
    assert model.config.image_size == 16 and model.config.feature_dim == 128 and model.config.num_classes == 10
    assert sum(p.numel() for p in model.parameters()) < 100_000
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


def test_config_dict_rebuilds_the_same_network():
    model = tiny_net()
    rebuilt = build_evalnet(model.config_dict())
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert rebuilt.config == model.config and torch.equal(rebuilt(x), model(x))
    assert model.config_dict()["channels"] == [8, 16]  # JSON-ready: tuples become lists


def test_bad_config_keys_fail_by_name():
    with pytest.raises(ValueError, match="feature_dims"):
        build_evalnet({"feature_dims": 3})
    with pytest.raises(ValueError, match="'channels'"):
        build_evalnet({"channels": [12]})  # not a multiple of norm_groups
    with pytest.raises(ValueError, match="'image_size'"):
        build_evalnet({"image_size": 2, "channels": [8, 8, 8]})


def test_same_seed_same_weights_and_outputs_and_independent_of_batch_composition():
    a, b = tiny_net(seed=1), tiny_net(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    assert torch.equal(a.features(x)[0], b.features(x)[0])
    # GroupNorm normalises per image: an image's features do not depend on its batch neighbours.
    torch.testing.assert_close(a.features(x[:2])[0], a.features(x)[0][:2], rtol=1e-5, atol=1e-6)


def test_wrong_channel_count_is_refused():
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        tiny_net().features(torch.zeros(2, 1, 8, 8))


def test_embed_images_batches_uint8_images_like_features():
    model = tiny_net().train()
    images_NHWC = np.random.default_rng(0).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    features_ND, logits_NC = embed_images(model, images_NHWC, batch_size=3)
    assert features_ND.shape == (7, 12) and logits_NC.shape == (7, 5) and features_ND.dtype == np.float64
    with torch.no_grad():
        expected, _ = model.features(images_to_input(images_NHWC))
    np.testing.assert_allclose(features_ND, expected.double().numpy(), rtol=1e-5, atol=1e-6)
    assert model.training  # the mode is restored
    x = images_to_input(np.array([[[[0, 255, 0]]]], dtype=np.uint8))
    assert x.tolist() == [[[[-1.0]], [[1.0]], [[-1.0]]]]
    with pytest.raises(ValueError, match="uint8"):
        images_to_input(np.zeros((1, 8, 8, 3), dtype=np.float32))
