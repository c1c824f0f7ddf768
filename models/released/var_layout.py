"""The released VAR layouts (keys -> shapes), as the authors' constructors define them
(FoundationVision/VAR ``models/vqvae.py``, ``quant.py``, ``basic_vae.py``, ``var.py``,
``basic_var.py``), and random stand-ins for the released files built from them.

No released weights can be downloaded in tests or benchmarks; these stand-ins have the released
key names and shapes (checked against state dicts made by the authors' own constructors in
``tests/assets/released``) with random values.
"""

from __future__ import annotations

import torch

from models.released.var import PATCH_NUMS


def vqvae_layout(*, ch=160, ch_mult=(1, 1, 2, 2, 4), res_blocks=2, z=32, vocab=4096, scales=10, phis=4) -> dict:
    """Keys -> shapes of VAR's ``VQVAE`` state dict (defaults: ``vae_ch160v4096z32.pth``)."""
    shapes: dict[str, tuple] = {}

    def conv(name, c_out, c_in, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c_out, c_in, k, k), (c_out,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resblock(name, c_in, c_out):
        norm(f"{name}.norm1", c_in), conv(f"{name}.conv1", c_out, c_in, 3)
        norm(f"{name}.norm2", c_out), conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_out, c_in, 1)

    def attn(name, c):
        norm(f"{name}.norm", c), conv(f"{name}.qkv", 3 * c, c, 1), conv(f"{name}.proj_out", c, c, 1)

    def mid(name, c):
        resblock(f"{name}.block_1", c, c), attn(f"{name}.attn_1", c), resblock(f"{name}.block_2", c, c)

    last = len(ch_mult) - 1
    conv("encoder.conv_in", ch, 3, 3)
    c_in = ch
    for i, m in enumerate(ch_mult):
        for j in range(res_blocks):
            resblock(f"encoder.down.{i}.block.{j}", c_in, ch * m)
            c_in = ch * m
            if i == last:
                attn(f"encoder.down.{i}.attn.{j}", c_in)
        if i != last:
            conv(f"encoder.down.{i}.downsample.conv", c_in, c_in, 3)
    mid("encoder.mid", c_in), norm("encoder.norm_out", c_in), conv("encoder.conv_out", z, c_in, 3)
    conv("decoder.conv_in", c_in, z, 3), mid("decoder.mid", c_in)
    for i in reversed(range(len(ch_mult))):
        for j in range(res_blocks + 1):
            resblock(f"decoder.up.{i}.block.{j}", c_in, ch * ch_mult[i])
            c_in = ch * ch_mult[i]
            if i == last:
                attn(f"decoder.up.{i}.attn.{j}", c_in)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c_in, c_in, 3)
    norm("decoder.norm_out", c_in), conv("decoder.conv_out", 3, c_in, 3)
    conv("quant_conv", z, z, 3), conv("post_quant_conv", z, z, 3)
    shapes["quantize.embedding.weight"] = (vocab, z)
    shapes["quantize.ema_vocab_hit_SV"] = (scales, vocab)
    for k in range(phis):
        conv(f"quantize.quant_resi.qresi_ls.{k}", z, z, 3)
    return shapes


def var_layout(*, depth=16, width=None, vocab=4096, z=32, classes=1000, scales=PATCH_NUMS["256"]) -> dict:
    """Keys -> shapes of VAR's ``VAR`` state dict (``var_dN.pth``: width 64·N, N heads, cosine
    attention, per-block AdaLN)."""
    width = width or 64 * depth
    seq_len = sum(side * side for side in scales)
    shapes = {
        "word_embed.weight": (width, z), "word_embed.bias": (width,), "class_emb.weight": (classes + 1, width),
        "pos_start": (1, scales[0] ** 2, width), "pos_1LC": (1, seq_len, width),
        "lvl_embed.weight": (len(scales), width),
        "lvl_1L": (1, seq_len), "attn_bias_for_masking": (1, 1, seq_len, seq_len),
        "head_nm.ada_lin.1.weight": (2 * width, width), "head_nm.ada_lin.1.bias": (2 * width,),
        "head.weight": (vocab, width), "head.bias": (vocab,),
    }  # fmt: skip
    for i in range(depth):
        shapes |= {
            f"blocks.{i}.attn.scale_mul_1H11": (1, depth, 1, 1), f"blocks.{i}.attn.q_bias": (width,),
            f"blocks.{i}.attn.v_bias": (width,), f"blocks.{i}.attn.zero_k_bias": (width,),
            f"blocks.{i}.attn.mat_qkv.weight": (3 * width, width),
            f"blocks.{i}.attn.proj.weight": (width, width), f"blocks.{i}.attn.proj.bias": (width,),
            f"blocks.{i}.ffn.fc1.weight": (4 * width, width), f"blocks.{i}.ffn.fc1.bias": (4 * width,),
            f"blocks.{i}.ffn.fc2.weight": (width, 4 * width), f"blocks.{i}.ffn.fc2.bias": (width,),
            f"blocks.{i}.ada_lin.1.weight": (6 * width, width), f"blocks.{i}.ada_lin.1.bias": (6 * width,),
        }  # fmt: skip
    return shapes


def derived_value(name: str, shape: tuple, scales: tuple[int, ...], device=None) -> torch.Tensor | None:
    """VAR's derived buffers at their true values (None for a weight)."""
    levels = torch.tensor([k for k, side in enumerate(scales) for _ in range(side * side)], device=device)
    if name == "lvl_1L":
        return levels[None]
    if name == "attn_bias_for_masking":
        return torch.where(levels[:, None] >= levels[None, :], 0.0, -torch.inf)[None, None]
    if name.endswith("zero_k_bias"):
        return torch.zeros(shape, device=device)
    return None


def random_released(shapes: dict, scales: tuple[int, ...], *, device=None, seed=0) -> dict[str, torch.Tensor]:
    """A stand-in for a released file: N(0, 0.2²) weights (uninitialised on the meta device, for
    shape-only checks of the official sizes) and VAR's derived buffers at their true values."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        value = derived_value(name, shape, scales, device)
        if value is None:
            value = (
                torch.empty(shape, device=device) if device == "meta" else torch.randn(shape, generator=generator) * 0.2
            )
        out[name] = value
    return out
