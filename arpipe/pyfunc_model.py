"""MLflow pyfunc "model from code" for a registered arpipe checkpoint: class labels in, images out.

Logged by the ``evaluate`` stage with two artifacts, ``model`` (an AR checkpoint folder) and
``tokenizer`` (its tokenizer folder), both safetensors + config.json, and ``models/`` as code.
Input: a DataFrame with a ``label`` column (class index or class name) and optional
``cfg_scale`` (guidance scale, default 1.0 = guidance-free; a VAR ramps it over its scales, as its
authors do) and ``seed`` (default 0) columns. Output: uint8 images (N, H, W, 3), one per row, in
row order. Rows sharing (cfg_scale, seed) are sampled as one batch. The logged model's signature
says the same (``core.registry.sampler_signature``): label any type, cfg_scale double, seed long,
images uint8.

    mlflow models predict -m models:/arpipe-gpt@champion --env-manager local \\
        -i labels.json -t json     # labels.json: {"dataframe_split": {"columns": ["label"], "data": [[3], [7]]}}
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class ARImageGenerator(PythonModel):
    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        from models.ar import ar_from_state, tokenizer_from_state

        tokenizer_dir, model_dir = Path(context.artifacts["tokenizer"]), Path(context.artifacts["model"])
        tokenizer_config = json.loads((tokenizer_dir / "config.json").read_text())
        self.tokenizer = tokenizer_from_state(load_file(tokenizer_dir / "model.safetensors"), tokenizer_config)
        config = json.loads((model_dir / "config.json").read_text())
        self.model = ar_from_state(load_file(model_dir / "model.safetensors"), config, self.tokenizer)
        self.class_names = list(config["class_names"])
        self.arch = config["arch"]

    def _label(self, value) -> int:
        text = str(value)
        if text in self.class_names:
            return self.class_names.index(text)
        if text.lstrip("-").isdigit() and 0 <= int(text) < len(self.class_names):
            return int(text)
        raise ValueError(f"unknown class {value!r}: expected one of {self.class_names} or an index")

    # the DataFrame hint stops MLflow's "add type hints" warning; the input is checked against the
    # signature evaluate logs (core.registry.sampler_signature), then by hand below
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        import torch

        from models.ar import sample_images
        from models.sampling import family_filters, guidance_per_step

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "label" not in frame.columns:
            raise ValueError(f"input needs a 'label' column, got columns {list(frame.columns)}")
        labels = [self._label(v) for v in frame["label"]]
        scales = [float(v) for v in frame["cfg_scale"]] if "cfg_scale" in frame.columns else [1.0] * len(labels)
        seeds = [int(v) for v in frame["seed"]] if "seed" in frame.columns else [0] * len(labels)
        out: list[np.ndarray | None] = [None] * len(labels)
        # the family's authors' sampling, as evaluate scored it (VAR: linear guidance ramp, top-k/p)
        top_k, top_p = family_filters("auto", "auto", arch=self.arch, vocab_size=self.model.config.vocab_size)
        for scale, seed in dict.fromkeys(zip(scales, seeds, strict=True)):
            rows = [i for i in range(len(labels)) if (scales[i], seeds[i]) == (scale, seed)]
            guidance = guidance_per_step(scale, "auto", arch=self.arch, steps=self.model.steps)
            images = sample_images(self.model, self.tokenizer, torch.tensor([labels[i] for i in rows]),
                                   cfg_scale=guidance, top_k=top_k, top_p=top_p, seed=seed).numpy()  # fmt: skip
            for i, image in zip(rows, images, strict=True):
                out[i] = image
        return np.stack(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


mlflow.models.set_model(ARImageGenerator())
