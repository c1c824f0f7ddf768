"""A randomly initialised InceptionV3 state dict in the exact format torch-fidelity loads.

The real weights (``weights-inception-2015-12-05-6726825d.pth``, 95 MB) are not available offline,
so tests build torch-fidelity's own ``FeatureExtractorInceptionV3`` with its weight loading
switched off (no file read, no URL fetched), re-initialise it so activations keep their scale
through ~50 layers (PyTorch's default init shrinks them to ~1e-8), and save its ``state_dict()``
with ``torch.save``: the same keys, shapes and container (a plain dict) as the published file.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from models.inception import FEATURES, _extractor_class

# not pytest.importorskip: `import torch_fidelity` fails here on torchvision, which models/inception.py avoids
needs_torch_fidelity = pytest.mark.skipif(
    importlib.util.find_spec("torch_fidelity") is None,
    reason="torch-fidelity is not installed (`make install` installs it with --no-deps)",
)


def write_random_inception_weights(path: Path, seed: int = 0) -> Path:
    extractor_class = _extractor_class()
    module = __import__(extractor_class.__module__, fromlist=["load_state_dict_from_url"])
    original_fetch, original_load = module.load_state_dict_from_url, extractor_class.load_state_dict

    def no_fetch(*args, **kwargs):
        return {}

    try:
        module.load_state_dict_from_url = no_fetch  # the constructor's only weight source without a path
        extractor_class.load_state_dict = lambda self, state, *args, **kwargs: None
        torch.manual_seed(seed)
        extractor = extractor_class("inception-v3-compat", list(FEATURES))
    finally:
        module.load_state_dict_from_url = original_fetch
        extractor_class.load_state_dict = original_load
    with torch.no_grad():
        for layer in extractor.modules():
            if isinstance(layer, nn.Conv2d | nn.Linear):
                fan_in = layer.weight[0].numel()
                layer.weight.normal_(0, math.sqrt(2 / fan_in))
    path.parent.mkdir(parents=True, exist_ok=True)
    # the published file (torch-fidelity's utils/util_convert_inception_weights.py) is a plain dict of
    # conv, batch-norm (weight, bias, running mean and variance: no num_batches_tracked) and fc tensors
    state = {k: v for k, v in extractor.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return path
