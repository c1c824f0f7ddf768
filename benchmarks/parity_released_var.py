"""Parity of imported VAR checkpoints with the authors' code, at fp32 on the CPU.

    python benchmarks/parity_released_var.py --var DIR [--write-golden tests/assets/released]

``DIR`` is a checkout of FoundationVision/VAR (its ``models/`` package is imported read-only; its
``dist`` helpers are stubbed). A child process, with only ``DIR`` on its path, builds the authors'
tiny VQVAE (their ``VQVAE`` with their ``Encoder``/``Decoder`` at ch 32, levels (1, 2), 1 res
block, z 8, vocabulary 64, scales (1, 2, 3, 4)) and a tiny ``VAR`` (2 blocks, width 32, 2 heads,
cosine attention, 10 classes) with seeded random weights (rounded to fp16 so the fixtures can be
stored in half the bytes; both sides compute in fp32), runs them and writes their state dicts in
the released layout with inputs and outputs. This process converts the state dicts with
``models.released.var``, runs our modules and prints the max-abs differences: VQ indices of every
scale (must be equal), decoded images, teacher-forced logits, and images sampled with VAR's
guidance ramp (cfg 1.5, top-k 32, top-p 0.9, seed 7) through our ``generate`` with
``linear_guidance_ramp(2.5, 4)``.

``--write-golden`` keeps the child's files (``var_vqvae.safetensors``, ``var_var.safetensors``)
for ``tests/models/test_released_var.py``, which runs the same comparison without the authors' code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SCALES = (1, 2, 3, 4)
TINY = {"vocab": 64, "z": 8, "ch": 32, "ch_mult": (1, 2), "res_blocks": 1, "depth": 2, "width": 32, "classes": 10}
SAMPLING = {"cfg": 1.5, "top_k": 32, "top_p": 0.9, "seed": 7}


# -- child: the authors' code only ---------------------------------------------------------------


def _authors(var_dir: str, out_dir: str) -> None:
    import types

    sys.path.insert(0, var_dir)
    import torch

    dist = types.ModuleType("dist")  # VAR's dist.py needs a process group; the models only ask these
    dist.get_device = lambda: torch.device("cpu")
    dist.initialized = lambda: False
    sys.modules["dist"] = dist
    from safetensors.torch import save_file

    from models.basic_vae import Decoder, Encoder  # the authors' package, not ours
    from models.var import VAR
    from models.vqvae import VQVAE

    torch.manual_seed(0)
    torch.set_num_threads(1)
    vae = VQVAE(vocab_size=TINY["vocab"], z_channels=TINY["z"], ch=TINY["ch"], test_mode=True,
                share_quant_resi=4, v_patch_nums=SCALES)  # fmt: skip
    backbone = dict(ch=TINY["ch"], ch_mult=TINY["ch_mult"], num_res_blocks=TINY["res_blocks"], dropout=0.0,
                    z_channels=TINY["z"], using_sa=True, using_mid_sa=True)  # fmt: skip
    vae.encoder, vae.decoder = Encoder(double_z=False, **backbone), Decoder(**backbone)
    vae.eval()
    model = VAR(vae_local=vae, num_classes=TINY["classes"], depth=TINY["depth"], embed_dim=TINY["width"],
                num_heads=TINY["depth"], drop_path_rate=0.0, norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.0,
                attn_l2_norm=True, patch_nums=SCALES, flash_if_available=False, fused_if_available=False)  # fmt: skip
    model.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights of a sensible size, exactly representable in fp16
        for name, param in [*vae.named_parameters(), *model.named_parameters()]:
            fan_in = param[0].numel() if param.ndim > 1 else 1
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("scale_mul_1H11"):
                value = noise * 0.3 + torch.tensor(4.0).log()
            elif param.ndim == 1 and ("norm" in name or name.endswith(("q_bias", "v_bias"))):
                value = (1.0 if name.endswith("weight") else 0.0) + 0.1 * noise
            elif name.startswith("quantize.embedding"):  # codes the size of the residuals: varied indices
                value = noise * 1.2
            elif name.startswith("decoder.conv_out"):  # images inside (-1, 1), not clamped flat
                value = noise * 0.1 / fan_in**0.5
            else:
                value = noise / fan_in**0.5
            param.copy_(value.half().float())
        vae.quantize.ema_vocab_hit_SV.copy_(torch.rand(vae.quantize.ema_vocab_hit_SV.shape, generator=generator))

        images = (torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1).half().float()
        idx = vae.img_to_idxBl(images)
        recon = vae.img_to_reconstructed_img(images, last_one=True)
        decoded = vae.idxBl_to_img(idx, same_shape=True, last_one=True)
        tokens = torch.cat(
            [torch.cat(idx, 1), torch.randint(TINY["vocab"], (2, sum(s * s for s in SCALES)), generator=generator)]
        )
        labels = torch.tensor([3, 7, 0, TINY["classes"]])
        per_scale = list(tokens.split([s * s for s in SCALES], dim=1))
        logits = model(labels, vae.quantize.idxBl_to_var_input(per_scale))
        sample_labels = torch.tensor([1, 2, 5, 9])
        sampled = model.autoregressive_infer_cfg(
            len(sample_labels), sample_labels, g_seed=SAMPLING["seed"], cfg=SAMPLING["cfg"],
            top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"],
        )  # fmt: skip

    half = lambda sd: {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}  # noqa: E731
    meta = {"scales": "_".join(map(str, SCALES)), "model": f"d{TINY['depth']}", "sampling": json.dumps(SAMPLING)}
    out = Path(out_dir)
    vae_sd = half(vae.state_dict())
    vae_sd["quantize.ema_vocab_hit_SV"] = vae.quantize.ema_vocab_hit_SV.clone()  # not fp16-exact
    save_file({**{f"released.{k}": v for k, v in vae_sd.items()}, "in.images": images,
               "out.indices": torch.cat(idx, 1), "out.recon": recon, "out.decoded": decoded},
              out / "var_vqvae.safetensors", metadata=meta)  # fmt: skip
    save_file({**{f"released.{k}": v.contiguous() for k, v in half(model.state_dict()).items()},
               "in.tokens": tokens, "in.labels": labels, "out.logits": logits.float(),
               "in.sample_labels": sample_labels, "out.sampled": sampled},
              out / "var_var.safetensors", metadata=meta)  # fmt: skip


# -- parent: our converter and modules -------------------------------------------------------------


def load_fixture(path: Path) -> tuple[dict, dict, dict]:
    """(released state dict in fp32, other tensors, metadata) of a fixture file."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    released = {k.removeprefix("released."): v for k, v in tensors.items() if k.startswith("released.")}
    released = {k: v.float() if v.dtype == torch.float16 else v for k, v in released.items()}
    return released, {k: v for k, v in tensors.items() if not k.startswith("released.")}, meta


def compare(vqvae_file: Path, var_file: Path) -> dict[str, float]:
    """Convert the fixtures' released state dicts, run our modules, return the max-abs differences."""
    import torch

    from models.ar import ar_from_state, tokenizer_from_state
    from models.released.var import convert_var, convert_vqvae
    from models.sampling import linear_guidance_ramp

    released, data, meta = load_fixture(vqvae_file)
    converted = convert_vqvae(released, model=meta["scales"])
    tokenizer = tokenizer_from_state(converted.state_dict, converted.config)
    released_var, var_data, _ = load_fixture(var_file)
    converted_var = convert_var(released_var, model=meta["model"], tokenizer=converted.config)
    model = ar_from_state(converted_var.state_dict, converted_var.config, tokenizer)
    sampling = json.loads(meta["sampling"])
    with torch.no_grad():
        indices = tokenizer.encode(data["in.images"])
        recon = tokenizer.decode(indices)
        logits = model(var_data["in.tokens"], var_data["in.labels"], label_dropout=False)
        ramp = linear_guidance_ramp(1 + sampling["cfg"], model.steps)
        generator = torch.Generator().manual_seed(sampling["seed"])
        sampled_tokens = model.generate(var_data["in.sample_labels"], cfg_scale=ramp, top_k=sampling["top_k"],
                                        top_p=sampling["top_p"], generator=generator)  # fmt: skip
        sampled = (tokenizer.decode(sampled_tokens) + 1) / 2
    return {
        "index_mismatches": int((indices != data["out.indices"]).sum()),
        "recon_max_abs": float((recon - data["out.recon"]).abs().max()),
        "decoded_max_abs": float((tokenizer.decode(data["out.indices"]) - data["out.decoded"]).abs().max()),
        "logits_max_abs": float((logits - var_data["out.logits"]).abs().max()),
        "logits_scale": float(var_data["out.logits"].abs().max()),
        "sampled_ramp_max_abs": float((sampled - var_data["out.sampled"]).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--var", required=True, help="a checkout of FoundationVision/VAR (read only)")
    parser.add_argument("--write-golden", default="", help="keep the fixtures in this folder")
    parser.add_argument("--authors-out", default="", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.authors_out:
        _authors(args.var, args.authors_out)
        return
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.write_golden) if args.write_golden else Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        # a fresh interpreter whose `models` is the authors' package
        subprocess.run([sys.executable, __file__, "--var", str(Path(args.var).resolve()), "--authors-out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        print(json.dumps(compare(out / "var_vqvae.safetensors", out / "var_var.safetensors"), indent=1))


if __name__ == "__main__":
    main()
