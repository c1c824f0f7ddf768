"""LlamaGen's released files -> arpipe ``vq`` tokenizers and ``gpt`` models.

``llamagen-vq`` (``vq_ds16_c2i.pt`` = VQ-16, ``vq_ds8_c2i.pt`` = VQ-8; ``VQModel`` of
``tokenizer/tokenizer_image/vq_model.py``) -> ``models.vq.VQTokenizer``:
    encoder/decoder ``conv_blocks.{i}.res.{j}`` / ``.attn.{j}`` / ``.downsample`` / ``.upsample``
    -> the flat ``levels`` Sequential; attention's separate q, k, v 1×1 convs -> one fused ``qkv``;
    ``nin_shortcut`` -> ``shortcut``; ``quantize.embedding`` -> ``quantizer.codebook``.
    Sizes from shapes: base channels, channel multipliers, res blocks, z channels, codebook size
    and dim. GroupNorm has 32 groups (hard-coded there). ``image_size`` (256 unless given) fixes
    the token grid; the same file serves 256 and 384 px.
    Not copied: ``quantize.codebook_used`` (a training ring buffer of recent indices for the usage
    metric); our quantizer's usage statistics start empty.

``llamagen-gpt`` (``c2i_{B,L,XL,XXL,3B}_{256,384}.pt``; ``Transformer`` of
``autoregressive/models/gpt.py``) -> ``models.gpt.GPT`` with ``prefix_rotation="zero"``:
    ``tok_embeddings`` -> ``token_embedding``; ``cls_embedding.embedding_table`` (classes + the null
    row) -> ``class_embedding``; ``layers.{i}.attention.wqkv`` / ``.wo`` -> ``blocks.{i}.attn.qkv`` /
    ``.proj`` (same q|k|v, head-major row order); ``feed_forward.w1`` (gate) and ``.w3`` (up) ->
    the fused ``ffn.gate_up`` = [w1; w3]; ``w2`` -> ``ffn.down``; ``norm`` -> ``final_norm``;
    ``output`` -> ``head``. Depth, width, FFN width (checked against LlamaGen's rounding to 256),
    vocabulary and classes from shapes; heads from the model name (or ``heads``); the token grid
    from the paired tokenizer. Rebuilt, not copied: ``freqs_cis`` (the rotary table, present in
    some files; its shape is checked).
"""

from __future__ import annotations

import torch

from models.gpt import GPT, GPTConfig
from models.released import Converted, ReleasedFormatError
from models.released.common import KeyLedger, check_against_module
from models.transformer_blocks import swiglu_hidden_width
from models.vq import CosineVectorQuantizer, VQConfig, VQTokenizer

VQ_MODELS = {"VQ-16": (1, 1, 2, 2, 4), "VQ-8": (1, 2, 2, 4)}
"""Released tokenizer name -> channel multipliers (base 128 channels, 2 res blocks, z 256)."""

GPT_MODELS = {
    "GPT-B": (12, 768, 12),
    "GPT-L": (24, 1024, 16),
    "GPT-XL": (36, 1280, 20),
    "GPT-XXL": (48, 1536, 24),
    "GPT-XXXL": (48, 2560, 40),
    "GPT-1B": (22, 2048, 32),
    "GPT-3B": (24, 3200, 32),
    "GPT-7B": (32, 4096, 32),
}
"""Released model name -> (layers, width, heads), as ``GPT_models`` in LlamaGen's gpt.py."""

LLAMAGEN_MULTIPLE_OF = 256  # SwiGLU hidden width rounding of every released LlamaGen GPT
LLAMAGEN_NORM_GROUPS = 32  # GroupNorm groups of LlamaGen's Normalize()


def _count(ledger: KeyLedger, pattern: str) -> int:
    """Number of consecutive indices i from 0 for which ``pattern.format(i)`` is a key."""
    n = 0
    while ledger.has(pattern.format(n)):
        n += 1
    return n


def _config(what: str, config_class: type, **values):
    """The arpipe config the inferred sizes make; its validation errors become format errors."""
    try:
        return config_class(**values)
    except ValueError as exc:
        raise ReleasedFormatError(f"{what}: {exc}") from None


# -- tokenizer -----------------------------------------------------------------------------------


def convert_vq(
    released: dict[str, torch.Tensor],
    *,
    model: str | None = None,
    tokenizer: dict | None = None,
    heads: int | None = None,
    image_size: int | None = None,
) -> Converted:
    """A LlamaGen ``VQModel`` state dict -> a ``vq`` tokenizer (see the module docstring)."""
    if tokenizer is not None or heads is not None:
        raise ReleasedFormatError("llamagen-vq is a tokenizer: it takes no tokenizer and no heads")
    ledger = KeyLedger(released, "llamagen-vq")
    config = _vq_config(ledger, model, image_size or 256)
    out = _VQMapper(ledger, config).state_dict()
    rebuilt = []
    if ledger.has("quantize.codebook_used"):
        rebuilt.append(ledger.skip("quantize.codebook_used"))
    ledger.finish()
    # our usage statistics start empty, as after a fresh init
    usage = CosineVectorQuantizer(config).usage.state_dict()
    out.update({f"quantizer.usage.{key}": value for key, value in usage.items()})

    with torch.device("meta"):
        module = VQTokenizer(config)
    check_against_module(out, module, "llamagen-vq")
    body = {
        "kind": module.kind,
        "model": module.config_dict(),
        "token_layout": module.token_layout,
        "codebook_size": module.codebook_size,
        "seq_len": module.seq_len,
        "image_size": config.image_size,
    }
    return Converted(config=body, state_dict=out, rebuilt=tuple(rebuilt))


def _vq_config(ledger: KeyLedger, model: str | None, image_size: int) -> VQConfig:
    """Sizes from the shapes (checked against ``model`` when named) + LlamaGen's fixed settings."""
    base, image_channels = ledger.shape("encoder.conv_in.weight")[:2]
    levels = _count(ledger, "encoder.conv_blocks.{}.res.0.conv1.weight")
    if levels == 0:
        ledger.missing("encoder.conv_blocks.0.res.0.conv1.weight")
    multipliers = []
    for i in range(levels):
        key = f"encoder.conv_blocks.{i}.res.0.conv1.weight"
        width = ledger.shape(key)[0]
        if width % base:
            raise ReleasedFormatError(f"llamagen-vq: key {key!r} has {width} channels, not a multiple of {base}")
        multipliers.append(width // base)
    multipliers = tuple(multipliers)
    if model is not None:
        model = model.upper()
        if model not in VQ_MODELS:
            raise ReleasedFormatError(f"unknown llamagen-vq model {model!r}; expected one of {', '.join(VQ_MODELS)}")
        if VQ_MODELS[model] != multipliers:
            raise ReleasedFormatError(
                f"llamagen-vq: {model} has channel multipliers {VQ_MODELS[model]}, the file {multipliers} "
                f"(key 'encoder.conv_blocks.{len(multipliers) - 1}.res.0.conv1.weight')"
            )
    res_blocks = _count(ledger, "encoder.conv_blocks.0.res.{}.conv1.weight")
    decoder_blocks = _count(ledger, "decoder.conv_blocks.0.res.{}.conv1.weight")
    if decoder_blocks != res_blocks + 1:
        raise ReleasedFormatError(
            f"llamagen-vq: the decoder has {decoder_blocks} res blocks per level (key "
            f"'decoder.conv_blocks.0.res.{decoder_blocks - 1}.conv1.weight'), expected the encoder's {res_blocks} + 1"
        )
    codebook_size, codebook_dim = ledger.shape("quantize.embedding.weight")
    return _config(
        "llamagen-vq",
        VQConfig,
        image_size=image_size,
        image_channels=image_channels,
        base_channels=base,
        channel_multipliers=multipliers,
        res_blocks=res_blocks,
        attention=ledger.has(f"encoder.conv_blocks.{levels - 1}.attn.0.q.weight"),
        norm_groups=LLAMAGEN_NORM_GROUPS,
        z_channels=ledger.shape("encoder.conv_out.weight")[0],
        codebook_size=codebook_size,
        codebook_dim=codebook_dim,
        commitment_weight=0.25,  # LlamaGen's beta
        restart_every=0,  # LlamaGen restarts no codes
    )


class _VQMapper:
    """Takes every weight of a LlamaGen VQModel from the ledger under its ``VQTokenizer`` name."""

    def __init__(self, ledger: KeyLedger, config: VQConfig):
        self.ledger, self.config, self.out = ledger, config, {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        config, widths = self.config, self.config.level_channels
        last, z, dim = len(widths) - 1, config.z_channels, config.codebook_dim
        # 1. encoder: level i is levels.{2i}, its downsample levels.{2i+1}
        self.conv("encoder.conv_in", "encoder.conv_in", config.image_channels, widths[0], 3)
        cin = widths[0]
        for i, width in enumerate(widths):
            theirs = f"encoder.conv_blocks.{i}"
            self.level(f"encoder.levels.{2 * i}", theirs, cin, width, config.res_blocks, i == last)
            if i != last:
                self.conv(f"encoder.levels.{2 * i + 1}.conv", f"{theirs}.downsample.conv", width, width, 3)
            cin = width
        self.mid("encoder.mid", "encoder.mid", widths[-1])
        self.norm("encoder.norm_out", "encoder.norm_out", widths[-1])
        self.conv("encoder.conv_out", "encoder.conv_out", widths[-1], z, 3)
        # 2. quantizer: 1×1 convs around the L2-normalised codebook
        self.conv("quant_conv", "quant_conv", z, dim, 1)
        self.copy("quantizer.codebook.weight", "quantize.embedding.weight", (config.codebook_size, dim))
        self.conv("post_quant_conv", "post_quant_conv", dim, z, 1)
        # 3. decoder: block k (lowest resolution first) is levels.{2k}, its upsample levels.{2k+1}
        self.conv("decoder.conv_in", "decoder.conv_in", z, widths[-1], 3)
        self.mid("decoder.mid", "decoder.mid", widths[-1])
        cin = widths[-1]
        for k, i in enumerate(reversed(range(len(widths)))):
            theirs = f"decoder.conv_blocks.{k}"
            self.level(f"decoder.levels.{2 * k}", theirs, cin, widths[i], config.res_blocks + 1, i == last)
            if i != 0:
                self.conv(f"decoder.levels.{2 * k + 1}.conv", f"{theirs}.upsample.conv", widths[i], widths[i], 3)
            cin = widths[i]
        self.norm("decoder.norm_out", "decoder.norm_out", widths[0])
        self.conv("decoder.conv_out", "decoder.conv_out", widths[0], config.image_channels, 3)
        return self.out

    def copy(self, ours: str, theirs: str, shape) -> None:
        self.out[ours] = self.ledger.take(theirs, shape)

    def conv(self, ours: str, theirs: str, cin: int, cout: int, k: int) -> None:
        self.copy(f"{ours}.weight", f"{theirs}.weight", (cout, cin, k, k))
        self.copy(f"{ours}.bias", f"{theirs}.bias", (cout,))

    def norm(self, ours: str, theirs: str, channels: int) -> None:
        self.copy(f"{ours}.weight", f"{theirs}.weight", (channels,))
        self.copy(f"{ours}.bias", f"{theirs}.bias", (channels,))

    def res(self, ours: str, theirs: str, cin: int, cout: int) -> None:
        self.norm(f"{ours}.norm1", f"{theirs}.norm1", cin)
        self.conv(f"{ours}.conv1", f"{theirs}.conv1", cin, cout, 3)
        self.norm(f"{ours}.norm2", f"{theirs}.norm2", cout)
        self.conv(f"{ours}.conv2", f"{theirs}.conv2", cout, cout, 3)
        if cin != cout:
            self.conv(f"{ours}.shortcut", f"{theirs}.nin_shortcut", cin, cout, 1)

    def attn(self, ours: str, theirs: str, channels: int) -> None:
        """Separate q, k, v 1×1 convs -> our fused qkv (rows q | k | v, as it chunks them)."""
        self.norm(f"{ours}.norm", f"{theirs}.norm", channels)
        take = self.ledger.take
        w_shape, b_shape = (channels, channels, 1, 1), (channels,)
        self.out[f"{ours}.qkv.weight"] = torch.cat([take(f"{theirs}.{n}.weight", w_shape) for n in "qkv"])
        self.out[f"{ours}.qkv.bias"] = torch.cat([take(f"{theirs}.{n}.bias", b_shape) for n in "qkv"])
        self.conv(f"{ours}.proj", f"{theirs}.proj_out", channels, channels, 1)

    def level(self, ours: str, theirs: str, cin: int, cout: int, blocks: int, lowest: bool) -> None:
        attention = self.config.attention and lowest
        step = 2 if attention else 1  # our level Sequential interleaves res and attention blocks
        for j in range(blocks):
            self.res(f"{ours}.{j * step}", f"{theirs}.res.{j}", cin if j == 0 else cout, cout)
            if attention:
                self.attn(f"{ours}.{j * step + 1}", f"{theirs}.attn.{j}", cout)

    def mid(self, ours: str, theirs: str, channels: int) -> None:
        self.res(f"{ours}.0", f"{theirs}.0", channels, channels)
        self.attn(f"{ours}.1", f"{theirs}.1", channels)
        self.res(f"{ours}.2", f"{theirs}.2", channels, channels)


# -- AR model ------------------------------------------------------------------------------------


def gpt_heads(model: str | None, heads: int | None, depth: int, width: int) -> int:
    """Heads from ``heads`` or the model name, after checking the name against the shapes."""
    if model is not None:
        name = model.upper()
        if name not in GPT_MODELS:
            raise ReleasedFormatError(f"unknown llamagen-gpt model {model!r}; expected one of {', '.join(GPT_MODELS)}")
        layers, dim, named_heads = GPT_MODELS[name]
        if (layers, dim) != (depth, width):
            found = [n for n, (d, w, _) in GPT_MODELS.items() if (d, w) == (depth, width)]
            hint = f" (that is {found[0]})" if found else ""
            raise ReleasedFormatError(
                f"llamagen-gpt: {name} has {layers} layers of width {dim}, the file {depth} of width {width}"
                f"{hint} (keys 'layers.{{i}}.attention.wqkv.weight')"
            )
        if heads is not None and heads != named_heads:
            raise ReleasedFormatError(f"llamagen-gpt: {name} has {named_heads} heads, not {heads}")
        return named_heads
    if heads is None:
        raise ReleasedFormatError("llamagen-gpt: the heads are in no tensor: give the model name (e.g. GPT-B) or heads")
    return heads


def convert_gpt(
    released: dict[str, torch.Tensor],
    *,
    model: str | None = None,
    tokenizer: dict | None = None,
    heads: int | None = None,
    image_size: int | None = None,
) -> Converted:
    """A LlamaGen c2i ``Transformer`` state dict + its tokenizer's config.json -> a ``gpt`` model."""
    ledger = KeyLedger(released, "llamagen-gpt")
    config = _gpt_config(ledger, model, tokenizer, heads, image_size)
    take, C, H = ledger.take, config.model_width, config.ffn_hidden
    out = {
        "class_embedding.weight": take("cls_embedding.embedding_table.weight", (config.num_classes + 1, C)),
        "token_embedding.weight": take("tok_embeddings.weight", (config.vocab_size, C)),
    }
    for i in range(config.depth):
        theirs, ours = f"layers.{i}", f"blocks.{i}"
        out[f"{ours}.attn_norm.weight"] = take(f"{theirs}.attention_norm.weight", (C,))
        # rows q | k | v, each head-major: the layout our qkv.view(B, L, 3, heads, head_dim) reads
        out[f"{ours}.attn.qkv.weight"] = take(f"{theirs}.attention.wqkv.weight", (3 * C, C))
        out[f"{ours}.attn.proj.weight"] = take(f"{theirs}.attention.wo.weight", (C, C))
        out[f"{ours}.ffn_norm.weight"] = take(f"{theirs}.ffn_norm.weight", (C,))
        gate = take(f"{theirs}.feed_forward.w1.weight", (H, C))
        up = take(f"{theirs}.feed_forward.w3.weight", (H, C))
        out[f"{ours}.ffn.gate_up.weight"] = torch.cat([gate, up])  # SwiGLU chunks gate first
        out[f"{ours}.ffn.down.weight"] = take(f"{theirs}.feed_forward.w2.weight", (C, H))
    out["final_norm.weight"] = take("norm.weight", (C,))
    out["head.weight"] = take("output.weight", (config.vocab_size, C))
    rebuilt = []
    if ledger.has("freqs_cis"):  # 1 class row + the grid, head_dim/2 pairs, (cos, sin)
        rebuilt.append(ledger.skip("freqs_cis", (1 + config.seq_len, config.head_dim // 2, 2)))
    ledger.finish()

    with torch.device("meta"):
        module = GPT(config)
    check_against_module(out, module, "llamagen-gpt")
    return Converted(config={"arch": "gpt", "model": module.config_dict()}, state_dict=out, rebuilt=tuple(rebuilt))


def _gpt_config(
    ledger: KeyLedger, model: str | None, tokenizer: dict | None, heads: int | None, image_size: int | None
) -> GPTConfig:
    """Sizes from the shapes, the grid from the tokenizer, heads from the name + LlamaGen's settings."""
    if tokenizer is None:
        raise ReleasedFormatError("llamagen-gpt needs the config.json of its imported tokenizer (llamagen-vq)")
    if image_size is not None and image_size != tokenizer["image_size"]:
        raise ReleasedFormatError(
            f"llamagen-gpt: the tokenizer was imported for {tokenizer['image_size']} px, not {image_size}: "
            "import it again with that image size"
        )
    grid = tokenizer.get("token_layout", {}).get("grid")
    if tokenizer.get("kind") != "vq" or grid is None:
        raise ReleasedFormatError(f"llamagen-gpt needs a single-scale vq tokenizer, got kind {tokenizer.get('kind')!r}")
    vocab_size, width = ledger.shape("tok_embeddings.weight")
    if vocab_size != tokenizer["codebook_size"]:
        raise ReleasedFormatError(
            f"llamagen-gpt: key 'tok_embeddings.weight' holds a vocabulary of {vocab_size} tokens, "
            f"the tokenizer's codebook has {tokenizer['codebook_size']} codes"
        )
    depth = _count(ledger, "layers.{}.attention.wqkv.weight")
    if depth == 0:
        ledger.missing("layers.0.attention.wqkv.weight")
    num_heads = gpt_heads(model, heads, depth, width)
    hidden, expected = (
        ledger.shape("layers.0.feed_forward.w1.weight")[0],
        swiglu_hidden_width(width, 4.0, LLAMAGEN_MULTIPLE_OF),
    )
    if hidden != expected:
        raise ReleasedFormatError(
            f"llamagen-gpt: key 'layers.0.feed_forward.w1.weight' has {hidden} rows, LlamaGen's FFN rounding "
            f"gives {expected} for width {width}"
        )
    return _config(
        "llamagen-gpt",
        GPTConfig,
        vocab_size=vocab_size,
        seq_len=tokenizer["seq_len"],
        num_classes=ledger.shape("cls_embedding.embedding_table.weight")[0] - 1,  # + the null class
        grid=tuple(grid),
        depth=depth,
        width=width,
        heads=num_heads,
        mlp_ratio=4.0,
        multiple_of=LLAMAGEN_MULTIPLE_OF,
        # train_c2i.py's defaults: class 0.1, token 0.1, resid and ffn 0.1 (--dropout-p)
        class_dropout=0.1,
        token_dropout=0.1,
        resid_dropout=0.1,
        ffn_dropout=0.1,
        rope_base=10000.0,
        norm_eps=1e-5,
        prefix_rotation="zero",
    )
