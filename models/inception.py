"""Inception-space features through torch-fidelity's InceptionV3, from a local weights file only.

torch-fidelity's ``FeatureExtractorInceptionV3`` ("inception-v3-compat") is a PyTorch port of
the 2015 TensorFlow Inception-v3 graph that the ADM evaluator uses: it resizes uint8 images to
299 x 299 with a TF1-compatible bilinear interpolation, normalises as (x - 128) / 128 and gives
the 2048-d pool features (``"2048"``: FID, precision/recall) and the 1008-way logits without the
bias (``"logits_unbiased"``: Inception Score). The metric math stays in ``models.metrics`` so that
both feature spaces are scored by the same code (torch-fidelity's ``calculate_metrics`` reads
folders or datasets through torchvision, and its precision/recall defaults to VGG16 features).

Nothing is downloaded: the extractor is always built with ``feature_extractor_weights_path``, so
torch-fidelity never reaches its release URL. The weights file is the one torch-fidelity
publishes (``weights-inception-2015-12-05-6726825d.pth``, a plain state dict); it is first read
with ``torch.load(weights_only=True)`` so that a malformed or non-tensor file fails here, with its
path, before torch-fidelity unpickles it (it loads with ``weights_only=False``).

torchvision: ``import torch_fidelity`` imports torchvision (for its CLIP, VGG16 and DINOv2
extractors and its datasets), and PyPI has no torchvision build for CPU-only torch (its wheels
link ``libtorch_cuda``). The InceptionV3 extractor itself needs only torch, so when the package
import fails on torchvision, its module ``torch_fidelity.feature_extractor_inceptionv3`` (with
the small torch-only modules it imports) is loaded without running the package ``__init__``.
torchvision is neither imported nor imitated.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

FEATURES = ("2048", "logits_unbiased")
FEATURE_DIM = 2048
INSTALL_HINT = "pip install --no-deps torch-fidelity==0.4.0 (it needs only torch, numpy, pillow and tqdm here)"


def _extractor_class() -> type[nn.Module]:
    """torch-fidelity's FeatureExtractorInceptionV3, without torchvision where it is unusable."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ImportError(f"evaluate.inception_weights needs torch-fidelity: {INSTALL_HINT}")
    try:
        from torch_fidelity import FeatureExtractorInceptionV3

        return FeatureExtractorInceptionV3
    except (ImportError, RuntimeError):
        # torchvision missing (ModuleNotFoundError) or a CUDA build on CPU torch (RuntimeError
        # "operator torchvision::nms does not exist"): load only the Inception module.
        pass
    spec = importlib.util.find_spec("torch_fidelity")
    package = importlib.util.module_from_spec(spec)  # the package, its __init__ not executed
    previous = sys.modules.get("torch_fidelity")
    sys.modules["torch_fidelity"] = package
    try:
        module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    finally:
        # No half-initialised package is left behind: a later `import torch_fidelity` runs the
        # real __init__ (and fails on torchvision exactly as it would have).
        if previous is None:
            sys.modules.pop("torch_fidelity", None)
        else:
            sys.modules["torch_fidelity"] = previous
    return module.FeatureExtractorInceptionV3


def load_inception(weights_path: str | Path) -> nn.Module:
    """torch-fidelity's InceptionV3 (eval mode, float32) with the weights at ``weights_path``."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} not found (nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"Inception weights {path} are not a readable torch state dict: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Inception weights {path} must hold a state dict of tensors, got {type(state).__name__}")
    extractor_class = _extractor_class()
    try:
        extractor = extractor_class("inception-v3-compat", list(FEATURES), feature_extractor_weights_path=str(path))
    except RuntimeError as error:  # load_state_dict: missing/unexpected keys, wrong shapes
        raise ValueError(
            f"Inception weights {path} do not fit torch-fidelity's InceptionV3 "
            f"(expected weights-inception-2015-12-05-6726825d.pth or the same format): {error}"
        ) from error
    return extractor.eval()


@torch.no_grad()
def embed_inception(
    extractor: nn.Module, images_NHWC: np.ndarray | torch.Tensor, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(features_N2048, logits_N1008) as float64 numpy of uint8 RGB NHWC images, in batches.

    ``softmax(logits)`` are the class probabilities of the Inception Score (1008 ImageNet-style
    classes: they say nothing about the dataset's own classes, so there is no class accuracy).
    """
    images = torch.as_tensor(images_NHWC)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        features_BD, logits_BC = extractor(images[start : start + batch_size].permute(0, 3, 1, 2).contiguous())
        features.append(features_BD.double().numpy())
        logits.append(logits_BC.double().numpy())
    if not features:
        return np.zeros((0, FEATURE_DIM)), np.zeros((0, 1008))
    return np.concatenate(features), np.concatenate(logits)
