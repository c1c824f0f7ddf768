"""VAR's released checkpoints -> arpipe ``msvq`` tokenizer and ``var`` model state dicts.

Formats (FoundationVision/VAR, ``models/vqvae.py``, ``quant.py``, ``basic_vae.py``, ``var.py``,
``basic_var.py``):
- ``var-vqvae`` (``vae_ch160v4096z32.pth``): the multi-scale residual VQVAE. Channels, level
  multipliers, res blocks, attention, z channels and vocabulary come from the shapes; the scale
  schedule (not stored) from ``model``: ``None``/``"256"`` (1,2,3,4,5,6,8,10,13,16), ``"512"``,
  ``"1024"`` (VAR's ``--pn``), or sides joined by ``_`` (``"1_2_3_4"``). φ is VAR's
  ``quant_resi`` 0.5 (a constructor argument, not stored). The result is ``MSVQTokenizer`` with
  ``scale_normalization`` off and ``norm_groups`` 32: with those it computes VAR's VQVAE.
- ``var`` (``var_d16.pth`` … ``var_d30.pth``): the next-scale transformer. Depth from the number of
  blocks, width, vocabulary and classes from shapes, heads from ``model`` (``dN``: N heads, VAR's
  ``heads = depth``) and checked against ``scale_mul_1H11``; scales and code width from the paired
  tokenizer's config.json, checked against the position table and ``word_embed``.

Released keys that are not copied (``rebuilt``):
- ``lvl_1L`` and ``attn_bias_for_masking``: VAR's scale index and block-causal mask, derived from
  the schedule (``VAR.levels_L``, ``VAR.attn_mask_LL``); their shapes and values are checked.
- ``blocks.N.attn.zero_k_bias``: the constant zero key bias (``ScaleAttention`` builds it); it must be zero.
- ``quantize.ema_vocab_hit_SV`` when its row count is not the schedule's (VAR's own
  ``load_state_dict`` drops it then too); otherwise it becomes the usage EMA ``hits_ema_KV``.
Buffers arpipe has and VAR has not (usage counters, restart candidates, per-scale statistics) start
at their fresh values: identity statistics, no updates, no candidates.

No arpipe module needed a new option: with the configs written here, ``MSVQTokenizer`` and ``VAR``
compute what the authors' modules compute (benchmarks/parity_released_var.py; fixtures in
tests/assets/released): plain Euclidean residual quantisation (``scale_normalization`` off),
GroupNorm(32, eps 1e-6), 3x3 quant/post-quant convs, area-down / bicubic-up, the partially shared
φ with VAR's ticks, the decoder's clamp; AdaLN rows (γ1, γ2, s1, s2, b1, b2), cosine attention
with a clamped per-head log-temperature (``attn_l2_norm``), q/v biases with a zero k bias, the
tanh-GELU MLP, ``AdaLNBeforeHead`` and a biased head. Two rounding-level differences remain: VAR
clamps the log-temperature at float32 log(100) (ours: float64), and computes code distances with
one ``addmm`` (ours: three ops); neither moved an index or a logit beyond 2e-6 in the parity runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from models.released import Converted, ReleasedFormatError
from models.tokenizers import tokenizer_config

PATCH_NUMS = {
    "256": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    "512": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    "1024": (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}
"""VAR's ``--pn`` presets (``utils/arg_util.py``): token-grid side per scale, coarse -> fine."""
QUANT_RESI = 0.5
"""φ(h) = (1 − r)·h + r·conv(h): VAR's ``quant_resi``, fixed at construction, not in the file."""
VAR_CLASS_DROPOUT = 0.1
"""VAR's ``cond_drop_rate`` (training only)."""
SIGNATURES = {
    "var-vqvae": "encoder.down.",
    "var": "class_emb.",
    "llamagen-vq": "encoder.conv_blocks.",
    "llamagen-gpt": "cls_embedding.",
}
"""A key prefix only that format has: names the format a wrong file looks like."""


# -- strict key accounting ----------------------------------------------------------------------


class _Keys:
    """The released tensors, consumed key by key: ``take`` checks presence and shape, ``done``
    fails on any key left over, so no weight is dropped silently."""

    def __init__(self, released: dict, format_name: str):
        if not isinstance(released, dict) or not released:
            raise ReleasedFormatError(
                f"{format_name}: expected a non-empty dict of tensors, got {type(released).__name__}"
            )
        for key, value in released.items():
            if not isinstance(value, torch.Tensor):
                raise ReleasedFormatError(f"{format_name}: key {key!r} holds a {type(value).__name__}, not a tensor")
        self.format_name = format_name
        self.remaining = dict(released)
        self.looks_like = next(
            (name for name, prefix in SIGNATURES.items() if any(key.startswith(prefix) for key in released)), None
        )
        self.rebuilt: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.remaining

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if key not in self.remaining:
            raise ReleasedFormatError(f"{self.format_name}: missing key {key!r}{self._looks_like()}")
        tensor = self.remaining.pop(key)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ReleasedFormatError(
                f"{self.format_name}: key {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
            )
        return tensor

    def take_float(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        tensor = self.take(key, shape)
        if not tensor.is_floating_point():
            raise ReleasedFormatError(f"{self.format_name}: key {key!r} is {tensor.dtype}, expected a float tensor")
        return tensor.float()

    def rebuild(self, key: str, shape: tuple[int, ...], check: Callable[[torch.Tensor], bool] | None = None) -> None:
        """Account for a derived buffer that the arpipe module rebuilds itself."""
        tensor = self.take(key, shape)
        if check is not None and tensor.device.type != "meta" and not check(tensor):
            raise ReleasedFormatError(f"{self.format_name}: key {key!r} does not hold the value VAR derives for it")
        self.rebuilt.append(key)

    def count(self, pattern: str) -> int:
        """How many consecutive indices ``i`` have a key starting with ``pattern.format(i)``."""
        n = 0
        while any(key.startswith(pattern.format(n)) for key in self.remaining):
            n += 1
        return n

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.remaining:
            raise ReleasedFormatError(f"{self.format_name}: missing key {key!r}{self._looks_like()}")
        return tuple(self.remaining[key].shape)

    def done(self) -> tuple[str, ...]:
        if self.remaining:
            extra = sorted(self.remaining)
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise ReleasedFormatError(f"{self.format_name}: unexpected key {extra[0]!r}{more}{self._looks_like()}")
        return tuple(self.rebuilt)

    def _looks_like(self) -> str:
        if self.looks_like in (None, self.format_name):
            return ""
        prefix = SIGNATURES[self.looks_like]
        return f"; this looks like a {self.looks_like} checkpoint (keys {prefix}*), not {self.format_name}"


# -- var-vqvae ---------------------------------------------------------------------------------


def _schedule(model: str | None) -> tuple[int, ...]:
    name = "256" if model is None else str(model)
    if name in PATCH_NUMS:
        return PATCH_NUMS[name]
    if re.fullmatch(r"\d+(_\d+)*", name):
        return tuple(int(side) for side in name.split("_"))
    raise ReleasedFormatError(
        f"var-vqvae: unknown model {model!r}; expected a resolution ({', '.join(PATCH_NUMS)}) or sides like '1_2_3_4'"
    )


def _take_conv(keys: _Keys, out: dict, src: str, dst: str, shape: tuple[int, ...]) -> None:
    out[f"{dst}.weight"] = keys.take_float(f"{src}.weight", shape)
    out[f"{dst}.bias"] = keys.take_float(f"{src}.bias", shape[:1])


def _take_norm(keys: _Keys, out: dict, src: str, dst: str, channels: int) -> None:
    out[f"{dst}.weight"] = keys.take_float(f"{src}.weight", (channels,))
    out[f"{dst}.bias"] = keys.take_float(f"{src}.bias", (channels,))


def _take_resblock(keys: _Keys, out: dict, src: str, dst: str, c_in: int, c_out: int) -> None:
    _take_norm(keys, out, f"{src}.norm1", f"{dst}.norm1", c_in)
    _take_conv(keys, out, f"{src}.conv1", f"{dst}.conv1", (c_out, c_in, 3, 3))
    _take_norm(keys, out, f"{src}.norm2", f"{dst}.norm2", c_out)
    _take_conv(keys, out, f"{src}.conv2", f"{dst}.conv2", (c_out, c_out, 3, 3))
    if c_in != c_out:
        _take_conv(keys, out, f"{src}.nin_shortcut", f"{dst}.shortcut", (c_out, c_in, 1, 1))


def _take_attn(keys: _Keys, out: dict, src: str, dst: str, channels: int) -> None:
    _take_norm(keys, out, f"{src}.norm", f"{dst}.norm", channels)
    _take_conv(keys, out, f"{src}.qkv", f"{dst}.qkv", (3 * channels, channels, 1, 1))
    _take_conv(keys, out, f"{src}.proj_out", f"{dst}.proj", (channels, channels, 1, 1))


def _take_mid(keys: _Keys, out: dict, src: str, dst: str, channels: int) -> None:
    _take_resblock(keys, out, f"{src}.block_1", f"{dst}.0", channels, channels)
    _take_attn(keys, out, f"{src}.attn_1", f"{dst}.1", channels)
    _take_resblock(keys, out, f"{src}.block_2", f"{dst}.2", channels, channels)


def _take_level(keys: _Keys, out: dict, src: str, dst: str, c_in: int, c_out: int, blocks: int, attention: bool):
    """VAR's ``down[i]`` / ``up[i]`` (``block.j``, ``attn.j``) -> one of our ``levels`` Sequentials
    (res block, then its attention block when the level has attention)."""
    index = 0
    for j in range(blocks):
        _take_resblock(keys, out, f"{src}.block.{j}", f"{dst}.{index}", c_in if j == 0 else c_out, c_out)
        index += 1
        if attention:
            _take_attn(keys, out, f"{src}.attn.{j}", f"{dst}.{index}", c_out)
            index += 1


def convert_vqvae(
    released: dict,
    *,
    model: str | None = None,
    tokenizer: dict | None = None,
    heads: int | None = None,
    image_size: int | None = None,
) -> Converted:
    """VAR's VQVAE state dict -> (``msvq`` tokenizer config.json body, ``MSVQTokenizer`` state dict).

    ``model`` or ``image_size``: the resolution whose scale schedule the tokenizer uses (256 if neither)."""
    if tokenizer is not None or heads is not None:
        raise ReleasedFormatError("var-vqvae is a tokenizer: it takes no tokenizer and no heads")
    if model is not None and image_size is not None and str(model) in PATCH_NUMS and str(model) != str(image_size):
        raise ReleasedFormatError(f"var-vqvae: model {model!r} and image size {image_size} disagree")
    keys = _Keys(released, "var-vqvae")
    scales = _schedule(model if model is not None else image_size)
    # 1. sizes from shapes
    base, image_channels = keys.shape("encoder.conv_in.weight")[:2]
    levels = keys.count("encoder.down.{}.")
    if levels < 1:
        keys.take("encoder.down.0.block.0.conv1.weight")  # raises, naming the key
    multipliers = []
    for i in range(levels):
        width = keys.shape(f"encoder.down.{i}.block.0.conv1.weight")[0]
        if width % base:
            raise ReleasedFormatError(
                f"var-vqvae: key 'encoder.down.{i}.block.0.conv1.weight' width {width} is not a multiple of {base}"
            )
        multipliers.append(width // base)
    res_blocks = keys.count("encoder.down.0.block.{}.")
    attention = keys.has(f"encoder.down.{levels - 1}.attn.0.norm.weight")
    z_channels = keys.shape("quant_conv.weight")[0]
    vocab = keys.shape("quantize.embedding.weight")[0]
    widths = [base * m for m in multipliers]
    # 2. encoder
    out: dict[str, torch.Tensor] = {}
    _take_conv(keys, out, "encoder.conv_in", "encoder.conv_in", (base, image_channels, 3, 3))
    seq, c_in = 0, base
    for i, width in enumerate(widths):
        has_attention = attention and i == levels - 1
        _take_level(keys, out, f"encoder.down.{i}", f"encoder.levels.{seq}", c_in, width, res_blocks, has_attention)
        seq += 1
        if i != levels - 1:
            _take_conv(
                keys, out, f"encoder.down.{i}.downsample.conv", f"encoder.levels.{seq}.conv", (width, width, 3, 3)
            )
            seq += 1
        c_in = width
    _take_mid(keys, out, "encoder.mid", "encoder.mid", widths[-1])
    _take_norm(keys, out, "encoder.norm_out", "encoder.norm_out", widths[-1])
    _take_conv(keys, out, "encoder.conv_out", "encoder.conv_out", (z_channels, widths[-1], 3, 3))
    # 3. quantizer: codebook, φ convs, usage EMA
    _take_conv(keys, out, "quant_conv", "quant_conv", (z_channels, z_channels, 3, 3))
    out["quantizer.codebook.weight"] = keys.take_float("quantize.embedding.weight", (vocab, z_channels))
    phi_shape = (z_channels, z_channels, 3, 3)
    if keys.has("quantize.quant_resi.qresi.weight"):  # share_quant_resi = 1: PhiShared
        phi_sources, share = ["quantize.quant_resi.qresi"], 1
    elif keys.has("quantize.quant_resi.qresi_ls.0.weight"):  # PhiPartiallyShared (released: 4)
        count = keys.count("quantize.quant_resi.qresi_ls.{}.")
        phi_sources, share = [f"quantize.quant_resi.qresi_ls.{k}" for k in range(count)], count
    else:  # share_quant_resi = 0: PhiNonShared, one per scale
        phi_sources, share = [f"quantize.quant_resi.{k}" for k in range(len(scales))], 0
    for k, src in enumerate(phi_sources):
        _take_conv(keys, out, src, f"quantizer.phis.{k}.conv", phi_shape)
    hits = keys.take_float("quantize.ema_vocab_hit_SV")
    if hits.ndim != 2 or hits.shape[1] != vocab:
        raise ReleasedFormatError(
            f"var-vqvae: key 'quantize.ema_vocab_hit_SV' has shape {tuple(hits.shape)}, expected (S, {vocab})"
        )
    if hits.shape[0] != len(scales):  # another schedule's monitor: VAR resets it too
        keys.rebuilt.append("quantize.ema_vocab_hit_SV")
        hits = torch.zeros(len(scales), vocab, device=hits.device)
    out["quantizer.usage.hits_ema_KV"] = hits
    # 4. decoder
    _take_conv(keys, out, "post_quant_conv", "post_quant_conv", (z_channels, z_channels, 3, 3))
    _take_conv(keys, out, "decoder.conv_in", "decoder.conv_in", (widths[-1], z_channels, 3, 3))
    _take_mid(keys, out, "decoder.mid", "decoder.mid", widths[-1])
    seq, c_in = 0, widths[-1]
    for i in reversed(range(levels)):
        has_attention = attention and i == levels - 1
        width = widths[i]
        _take_level(keys, out, f"decoder.up.{i}", f"decoder.levels.{seq}", c_in, width, res_blocks + 1, has_attention)
        seq += 1
        if i != 0:
            _take_conv(keys, out, f"decoder.up.{i}.upsample.conv", f"decoder.levels.{seq}.conv", (width, width, 3, 3))
            seq += 1
        c_in = width
    _take_norm(keys, out, "decoder.norm_out", "decoder.norm_out", widths[0])
    _take_conv(keys, out, "decoder.conv_out", "decoder.conv_out", (image_channels, widths[0], 3, 3))
    rebuilt = keys.done()

    # 5. the arpipe config that computes VAR's VQVAE, and our buffers at their fresh values
    model_config = {
        "image_size": scales[-1] * 2 ** (levels - 1),
        "image_channels": image_channels,
        "base_channels": base,
        "channel_multipliers": multipliers,
        "res_blocks": res_blocks,
        "attention": attention,
        "norm_groups": 32,  # VAR's Normalize: GroupNorm(32, eps 1e-6)
        "z_channels": z_channels,
        "codebook_size": vocab,
        "scales": list(scales),
        "commitment_weight": 0.25,  # VAR's beta
        "quant_resi": QUANT_RESI,
        "share_quant_resi": share,
        "scale_normalization": False,  # VAR quantises raw residuals
        "dead_code_threshold": 0.08,  # VAR's usage monitor
        "restart_every": 0,  # VAR never re-seeds codes
    }
    candidates = 1024  # MSVQConfig.candidate_buffer_size's default
    device = out["quantizer.codebook.weight"].device
    out |= {
        "quantizer.center_KC": torch.zeros(len(scales), z_channels, device=device),
        "quantizer.spread_K": torch.ones(len(scales), device=device),
        "quantizer.normalization_updates": torch.zeros((), dtype=torch.int64, device=device),
        "quantizer.usage.updates": torch.zeros((), dtype=torch.int64, device=device),
        "quantizer.usage.candidates_KND": torch.zeros(len(scales), candidates, z_channels, device=device),
        "quantizer.usage.filled_K": torch.zeros(len(scales), dtype=torch.int64, device=device),
        "quantizer.usage.write_at_K": torch.zeros(len(scales), dtype=torch.int64, device=device),
    }
    try:
        tokenizer_config("msvq", model_config)
    except ValueError as exc:
        raise ReleasedFormatError(f"var-vqvae: the shapes give an unusable tokenizer: {exc}") from exc
    config = {
        "kind": "msvq",
        "model": model_config,
        "token_layout": {"kind": "msvq", "scales": list(scales)},
        "codebook_size": vocab,
        "seq_len": sum(side * side for side in scales),
        "image_size": model_config["image_size"],
    }
    return Converted(config=config, state_dict=out, rebuilt=rebuilt)


# -- var -----------------------------------------------------------------------------------------


def _depth_from_name(model: str) -> int:
    match = re.fullmatch(r"d(\d+)", str(model))
    if not match or int(match.group(1)) < 1:
        raise ReleasedFormatError(f"var: unknown model {model!r}; expected dN (d16, d20, d24, d30): N blocks, N heads")
    return int(match.group(1))


def _check_tokenizer(tokenizer: dict, vocab: int, code_width: int) -> tuple[int, ...]:
    if not isinstance(tokenizer, dict) or tokenizer.get("kind") != "msvq":
        kind = tokenizer.get("kind") if isinstance(tokenizer, dict) else type(tokenizer).__name__
        raise ReleasedFormatError(
            f"var: the tokenizer must be a multi-scale (msvq) one such as an imported var-vqvae, got kind {kind!r}"
        )
    scales = tuple(tokenizer["token_layout"]["scales"])
    if tokenizer["codebook_size"] != vocab:
        raise ReleasedFormatError(
            f"var: key 'head.weight' predicts {vocab} tokens "
            f"but the tokenizer's codebook has {tokenizer['codebook_size']}"
        )
    if tokenizer["model"]["z_channels"] != code_width:
        raise ReleasedFormatError(
            f"var: key 'word_embed.weight' reads {code_width}-wide codes "
            f"but the tokenizer's are {tokenizer['model']['z_channels']}"
        )
    return scales


def convert_var(
    released: dict,
    *,
    model: str | None = None,
    tokenizer: dict | None = None,
    heads: int | None = None,
    image_size: int | None = None,
) -> Converted:
    """VAR's transformer state dict (``var_dN.pth``) -> (``var`` config.json body, ``VAR`` state dict).

    ``model``: ``dN`` (heads = N, VAR's rule; ``heads`` may only repeat it); ``tokenizer``: the
    paired tokenizer's config.json (its scale schedule fixes the resolution; ``image_size`` may only
    repeat it)."""
    if model is None or tokenizer is None:
        raise ReleasedFormatError("var: give the model name (--model d16 ... d30) and the imported var-vqvae tokenizer")
    keys = _Keys(released, "var")
    depth = _depth_from_name(model)
    if heads is not None and heads != depth:
        raise ReleasedFormatError(f"var: {model} has {depth} heads (VAR's rule: heads = depth), not {heads}")
    if image_size is not None and tokenizer.get("image_size") not in (None, image_size):
        raise ReleasedFormatError(
            f"var: image size {image_size} but the tokenizer was imported for {tokenizer['image_size']} px"
        )
    if keys.has("shared_ada_lin.1.weight") or keys.has("blocks.0.ada_gss"):
        raise ReleasedFormatError(
            "var: key 'shared_ada_lin.1.weight': shared AdaLN (VAR's --saln, d36-s) is not supported"
        )
    # 1. sizes from shapes, checked against the name and the tokenizer
    rows, width = keys.shape("class_emb.weight")
    vocab = keys.shape("head.weight")[0]
    code_width = keys.shape("word_embed.weight")[1]
    scales = _check_tokenizer(tokenizer, vocab, code_width)
    seq_len, first = sum(side * side for side in scales), scales[0] ** 2
    blocks = keys.count("blocks.{}.")
    if blocks != depth:
        raise ReleasedFormatError(
            f"var: model {model!r} has {depth} blocks but the file has {blocks} (key 'blocks.{blocks - 1}.*')"
        )
    heads = depth
    if width % heads:
        raise ReleasedFormatError(
            f"var: key 'class_emb.weight' width {width} is not divisible by {heads} heads ({model})"
        )
    l2_norm = keys.has("blocks.0.attn.scale_mul_1H11")
    hidden = keys.shape("blocks.0.ffn.fc1.weight")[0]
    # 2. inputs
    out: dict[str, torch.Tensor] = {
        "class_embedding.weight": keys.take_float("class_emb.weight"),
        "start_position": keys.take_float("pos_start", (1, first, width))[0],
        "word_embed.weight": keys.take_float("word_embed.weight", (width, code_width)),
        "word_embed.bias": keys.take_float("word_embed.bias", (width,)),
        "position_embedding": keys.take_float("pos_1LC", (1, seq_len, width))[0],
        "level_embedding.weight": keys.take_float("lvl_embed.weight", (len(scales), width)),
    }
    levels = torch.tensor([k for k, side in enumerate(scales) for _ in range(side * side)])
    keys.rebuild("lvl_1L", (1, seq_len), lambda t: torch.equal(t.cpu().long()[0], levels))
    mask = levels[None, :] <= levels[:, None]
    keys.rebuild("attn_bias_for_masking", (1, 1, seq_len, seq_len), lambda t: torch.equal(t.cpu()[0, 0] == 0, mask))
    # 3. blocks
    for i in range(depth):
        src, dst = f"blocks.{i}", f"blocks.{i}"
        out[f"{dst}.attn.qkv.weight"] = keys.take_float(f"{src}.attn.mat_qkv.weight", (3 * width, width))
        out[f"{dst}.attn.query_bias"] = keys.take_float(f"{src}.attn.q_bias", (width,))
        out[f"{dst}.attn.value_bias"] = keys.take_float(f"{src}.attn.v_bias", (width,))
        keys.rebuild(f"{src}.attn.zero_k_bias", (width,), lambda t: not t.any())
        if l2_norm:
            out[f"{dst}.attn.log_temperature"] = keys.take_float(f"{src}.attn.scale_mul_1H11", (1, heads, 1, 1)).view(
                heads
            )
        out[f"{dst}.attn.proj.weight"] = keys.take_float(f"{src}.attn.proj.weight", (width, width))
        out[f"{dst}.attn.proj.bias"] = keys.take_float(f"{src}.attn.proj.bias", (width,))
        out[f"{dst}.ffn.fc1.weight"] = keys.take_float(f"{src}.ffn.fc1.weight", (hidden, width))
        out[f"{dst}.ffn.fc1.bias"] = keys.take_float(f"{src}.ffn.fc1.bias", (hidden,))
        out[f"{dst}.ffn.fc2.weight"] = keys.take_float(f"{src}.ffn.fc2.weight", (width, hidden))
        out[f"{dst}.ffn.fc2.bias"] = keys.take_float(f"{src}.ffn.fc2.bias", (width,))
        out[f"{dst}.modulation.1.weight"] = keys.take_float(f"{src}.ada_lin.1.weight", (6 * width, width))
        out[f"{dst}.modulation.1.bias"] = keys.take_float(f"{src}.ada_lin.1.bias", (6 * width,))
    # 4. output
    out["final_norm.modulation.1.weight"] = keys.take_float("head_nm.ada_lin.1.weight", (2 * width, width))
    out["final_norm.modulation.1.bias"] = keys.take_float("head_nm.ada_lin.1.bias", (2 * width,))
    out["head.weight"] = keys.take_float("head.weight", (vocab, width))
    out["head.bias"] = keys.take_float("head.bias", (vocab,))
    rebuilt = keys.done()

    model_config = {
        "vocab_size": vocab,
        "scales": list(scales),
        "embed_dim": code_width,
        "num_classes": rows - 1,  # the last row is VAR's null class, as ours
        "depth": depth,
        "width": None if width == 64 * depth else width,
        "heads": None,  # = depth, VAR's rule
        "mlp_ratio": hidden / width,
        "class_dropout": VAR_CLASS_DROPOUT,
        "attn_l2_norm": l2_norm,
        "norm_eps": 1e-6,
    }
    if round(width * model_config["mlp_ratio"]) != hidden:
        raise ReleasedFormatError(f"var: key 'blocks.0.ffn.fc1.weight' hidden width {hidden} is not a ratio of {width}")
    config = {
        "arch": "var",
        "model": model_config,
        "token_layout": dict(tokenizer["token_layout"]),
        "image_size": tokenizer["image_size"],
    }
    return Converted(config=config, state_dict=out, rebuilt=rebuilt)
