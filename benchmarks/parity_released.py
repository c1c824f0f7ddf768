"""Parity of imported released models with the authors' code, fp32 on CPU.

For each family, the authors' modules are imported read-only from a local checkout (nothing of
theirs is copied into this repository), tiny models are built with their constructors and a fixed
seed, given random weights (rounded to fp16 so a fixture stores them exactly), run on a fixed
input, converted with ``models.released`` and run through arpipe's modules. Printed: max-abs
differences (and index mismatches). ``--official`` also runs the official sizes (VQ-16 on one
256-px image, GPT-B teacher-forced on 256 tokens) with random weights; ``--write-fixtures DIR``
saves the tiny cases as the golden files ``tests/models/test_released_llamagen.py`` checks.

    python benchmarks/parity_released.py --llamagen /tmp/llamagen [--official] [--write-fixtures tests/assets/released]

``--llamagen DIR``: a FoundationVision/LlamaGen checkout (needs ``tokenizer/tokenizer_image/vq_model.py``,
``autoregressive/models/gpt.py`` and ``autoregressive/models/generate.py``). VAR: ``--var DIR``
(to be added beside ``llamagen_cases``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from models.ar import ar_from_state, tokenizer_from_state  # noqa: E402
from models.released import converter  # noqa: E402

SEED = 0
TOLERANCE = 1e-3


@dataclass
class Case:
    name: str
    released: dict[str, torch.Tensor]
    """State dict in the released layout, as the authors' module holds it."""
    outputs: dict[str, torch.Tensor]
    """``input/*`` fed to the authors' module and ``output/*`` it computed."""
    meta: dict
    compare: Callable[[dict, dict, dict], dict[str, float]]
    """(released, outputs, meta) -> differences of our converted module: ``*max_abs`` floats and
    ``*mismatches`` counts."""
    fixture: bool = False
    """Written by ``--write-fixtures`` (tiny cases only)."""


def _import_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_llamagen(checkout: Path) -> types.SimpleNamespace:
    """The authors' vq_model, gpt and generate modules. gpt.py imports ``utils.drop_path`` (not
    needed at drop_path_rate 0): a stub stands in for it."""
    if "utils.drop_path" not in sys.modules:
        utils, drop_path = types.ModuleType("utils"), types.ModuleType("utils.drop_path")
        drop_path.DropPath = nn.Identity
        utils.drop_path = drop_path
        sys.modules.update({"utils": utils, "utils.drop_path": drop_path})
    vq = _import_file("llamagen_vq_model", checkout / "tokenizer/tokenizer_image/vq_model.py")
    gpt = _import_file("llamagen_gpt", checkout / "autoregressive/models/gpt.py")
    generate = _import_file("llamagen_generate", checkout / "autoregressive/models/generate.py")
    return types.SimpleNamespace(vq=vq, gpt=gpt, generate=generate)


def randomize_(module: nn.Module, generator: torch.Generator, std: float = 0.1) -> None:
    """Random weights with a spread that exercises every layer (norm gains near 1, biases and
    matrices ~N(0, std²), convs at 1/√fan_in), rounded to fp16-exact fp32 values."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("weight") and param.ndim == 1:  # norm gains
                value = 1 + 0.1 * torch.randn(param.shape, generator=generator)
            elif param.ndim == 4:  # convs
                value = torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5
            else:
                value = std * torch.randn(param.shape, generator=generator)
            param.copy_(value.half().float())


def released_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as the released files hold it (params and persistent buffers)."""
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


# -- LlamaGen cases ------------------------------------------------------------------------------


def tiny_llamagen_vq(lg: types.SimpleNamespace) -> tuple[nn.Module, dict]:
    """VQModel with a 32-channel, 2-level, 1-res-block backbone (their Encoder/Decoder constructors),
    z 32, a 64 × 8 codebook: 16-px images -> 8 × 8 tokens."""
    generator = torch.Generator().manual_seed(SEED)
    args = lg.vq.ModelArgs(codebook_size=64, codebook_embed_dim=8, encoder_ch_mult=[1, 1],
                           decoder_ch_mult=[1, 1], z_channels=32)  # fmt: skip
    model = lg.vq.VQModel(args)
    model.encoder = lg.vq.Encoder(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=32)
    model.decoder = lg.vq.Decoder(z_channels=32, ch=32, ch_mult=(1, 1), num_res_blocks=1)
    randomize_(model, generator)
    return model.eval(), {"image_size": 16}


def official_llamagen_vq(lg: types.SimpleNamespace) -> tuple[nn.Module, dict]:
    model = lg.vq.VQ_models["VQ-16"]()
    randomize_(model, torch.Generator().manual_seed(SEED))
    return model.eval(), {"image_size": 256, "model": "VQ-16"}


@torch.no_grad()
def run_llamagen_vq(model: nn.Module, image_size: int, batch: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED + 1)
    images = torch.rand(batch, 3, image_size, image_size, generator=generator) * 2 - 1
    _, _, (_, _, indices) = model.encode(images)
    side = image_size // 2 ** (len(model.config.encoder_ch_mult) - 1)
    decoded = model.decode_code(indices, (batch, model.config.codebook_embed_dim, side, side))
    return {"input/images": images, "output/indices": indices.view(batch, -1), "output/decoded": decoded}


@torch.no_grad()
def compare_llamagen_vq(released: dict, case: dict, meta: dict) -> dict[str, float]:
    converted = converter("llamagen-vq")(released, model=meta.get("model"), image_size=meta["image_size"])
    tokenizer = tokenizer_from_state(converted.state_dict, converted.config)
    tokens = tokenizer.encode(case["input/images"])
    decoded = tokenizer.decode_latent(
        tokenizer.quantizer.lookup(case["output/indices"], *converted.config["token_layout"]["grid"])
    )
    clamped = tokenizer.decode(case["output/indices"])
    return {
        "indices_compared": tokens.numel(),
        "decoded_reference_abs_max": float(case["output/decoded"].abs().max()),
        "index_mismatches": int((tokens != case["output/indices"]).sum()),
        "decoded_max_abs": float((decoded - case["output/decoded"]).abs().max()),
        "decoded_clamped_max_abs": float((clamped - case["output/decoded"].clamp(-1, 1)).abs().max()),
    }


def tiny_llamagen_gpt(lg: types.SimpleNamespace) -> tuple[nn.Module, dict]:
    """Transformer: 2 layers, width 64, 4 heads (head_dim 16), FFN 256 (their rounding), 64 tokens
    (8 × 8 grid), 10 classes + null."""
    args = lg.gpt.ModelArgs(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, block_size=64,
                            cls_token_num=1, class_dropout_prob=0.1)  # fmt: skip
    model = lg.gpt.Transformer(args)
    randomize_(model, torch.Generator().manual_seed(SEED))
    return model.eval(), {"model": None, "heads": 4, "grid": 8, "codebook_size": 64}


def official_llamagen_gpt(lg: types.SimpleNamespace) -> tuple[nn.Module, dict]:
    model = lg.gpt.GPT_models["GPT-B"](vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1)
    randomize_(model, torch.Generator().manual_seed(SEED), std=0.02)
    return model.eval(), {"model": "GPT-B", "heads": None, "grid": 16, "codebook_size": 16384}


@torch.no_grad()
def run_llamagen_gpt(lg, model: nn.Module, meta: dict, batch: int, generate: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED + 2)
    seq_len = meta["grid"] ** 2
    tokens = torch.randint(meta["codebook_size"], (batch, seq_len), generator=generator)
    labels = torch.randint(model.num_classes, (batch,), generator=generator)
    labels[-1] = model.num_classes  # the null class too
    # teacher forcing as train_c2i.py feeds it: [class, t_0 … t_{L-2}], eval mode (no dropout)
    logits, _ = model(tokens[:, :-1], labels, input_pos=torch.arange(seq_len))
    case = {"input/tokens": tokens, "input/labels": labels, "output/logits": logits}
    if generate:  # greedy through their KV cache, guidance-free and cfg_scale 2.0
        real = labels[:-1]
        for name, cfg_scale in (("output/greedy", 1.0), ("output/greedy_cfg2", 2.0)):
            case[name] = lg.generate.generate(model, real, seq_len, cfg_scale=cfg_scale, sample_logits=False).long()
    return case


def tokenizer_stub(meta: dict) -> dict:
    """The parts of an imported tokenizer's config.json the GPT converter reads."""
    side = meta["grid"]
    return {"kind": "vq", "token_layout": {"kind": "vq", "grid": [side, side]}, "codebook_size": meta["codebook_size"],
            "seq_len": side * side, "image_size": 16 * side}  # fmt: skip


@torch.no_grad()
def compare_llamagen_gpt(released: dict, case: dict, meta: dict) -> dict[str, float]:
    converted = converter("llamagen-gpt")(
        released, model=meta["model"], tokenizer=tokenizer_stub(meta), heads=meta["heads"]
    )
    model = ar_from_state(converted.state_dict, converted.config, tokenizer=None)
    logits = model(case["input/tokens"], case["input/labels"])
    result = {
        "logits_reference_std": float(case["output/logits"].std()),
        "logits_max_abs": float((logits - case["output/logits"]).abs().max()),
    }
    for name, cfg_scale in (("output/greedy", 1.0), ("output/greedy_cfg2", 2.0)):
        if name in case:
            tokens = model.generate(case["input/labels"][:-1], cfg_scale=cfg_scale, temperature=0.0)
            result[f"{name.split('/')[1]}_token_mismatches"] = int((tokens != case[name]).sum())
    return result


def llamagen_cases(checkout: Path, official: bool):
    """Case(name, released state dict, authors' inputs and outputs, metadata, our comparison) per
    case; tiny cases become fixtures, official ones are only compared."""
    lg = load_llamagen(checkout)
    model, meta = tiny_llamagen_vq(lg)
    released = released_state(model)  # before running: their generate() adds KV-cache buffers
    case = run_llamagen_vq(model, meta["image_size"], batch=2)
    yield Case("llamagen_vq", released, case, meta, compare_llamagen_vq, fixture=True)
    model, meta = tiny_llamagen_gpt(lg)
    released = released_state(model)
    case = run_llamagen_gpt(lg, model, meta, batch=3, generate=True)
    yield Case("llamagen_gpt", released, case, meta, compare_llamagen_gpt, fixture=True)
    if official:
        model, meta = official_llamagen_vq(lg)
        released = released_state(model)
        case = run_llamagen_vq(model, meta["image_size"], batch=1)
        yield Case("llamagen_vq16_official", released, case, meta, compare_llamagen_vq)
        del model, released
        model, meta = official_llamagen_gpt(lg)
        released = released_state(model)
        case = run_llamagen_gpt(lg, model, meta, batch=1, generate=False)
        yield Case("llamagen_gptb_official", released, case, meta, compare_llamagen_gpt)


OFFICIAL_VQ = ("VQ-16", "VQ-8")
OFFICIAL_GPT = ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B")


def llamagen_official_shapes(checkout: Path) -> dict[str, dict[str, list[int]]]:
    """Key -> shape of every official released layout, from the authors' constructors on the meta
    device (no memory): the table the shape-only tests convert. c2i GPTs as sample_c2i.py builds
    them (vocab 16384, 1000 classes, one class token); the 256 and 384 px files differ in no shape."""
    from accelerate import init_empty_weights  # parameters on meta; their gpt.py calls .item() at build

    lg = load_llamagen(checkout)
    tables = {}
    with init_empty_weights():
        for name in OFFICIAL_VQ:
            tables[name] = lg.vq.VQ_models[name]().state_dict()
        for name in OFFICIAL_GPT:
            tables[name] = lg.gpt.GPT_models[name](vocab_size=16384, block_size=256, num_classes=1000).state_dict()
    return {name: {k: list(v.shape) for k, v in table.items()} for name, table in tables.items()}


FIXTURE_OMITS = ("quantize.codebook_used",)
"""Not stored in fixtures: all zeros (VQModel's 65,536-slot usage ring buffer, untrained); the
test puts the zeros back."""


def write_fixture(out_dir: Path, name: str, released: dict, case: dict, meta: dict) -> Path:
    """Released weights stored as fp16 (they are fp16-exact), inputs and the authors' outputs."""
    omitted = {k: list(released[k].shape) for k in FIXTURE_OMITS if k in released}
    assert all(not released[k].any() for k in omitted), "only all-zero buffers may be left out"
    meta = {**meta, "zeros": omitted}
    tensors = {
        f"released/{k}": v.half() if v.is_floating_point() else v for k, v in released.items() if k not in omitted
    }
    tensors.update({k: v.contiguous() for k, v in case.items()})
    path = out_dir / f"{name}.safetensors"
    save_file(tensors, path, metadata={"meta": json.dumps(meta), "seed": str(SEED)})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llamagen", type=Path, help="FoundationVision/LlamaGen checkout")
    parser.add_argument("--official", action="store_true", help="also the official sizes (VQ-16, GPT-B)")
    parser.add_argument("--write-fixtures", type=Path, help="write the tiny cases here as golden files")
    parser.add_argument("--json", type=Path, help="write the differences here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = []
    if args.llamagen:
        cases.append(llamagen_cases(args.llamagen, args.official))
    if not cases:
        parser.error("give --llamagen DIR")
    if args.write_fixtures and args.llamagen:
        args.write_fixtures.mkdir(parents=True, exist_ok=True)
        path = args.write_fixtures / "llamagen_shapes.json"
        path.write_text(json.dumps(llamagen_official_shapes(args.llamagen), separators=(",", ":")) + "\n")
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    results, worst = {}, 0.0
    for c in (case for family in cases for case in family):
        name, released = c.name, c.released
        if args.write_fixtures and c.fixture:
            args.write_fixtures.mkdir(parents=True, exist_ok=True)
            path = write_fixture(args.write_fixtures, name, released, c.outputs, c.meta)
            print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
            released = {k: v.half().float() if v.is_floating_point() else v for k, v in released.items()}
        results[name] = diffs = c.compare(released, c.outputs, c.meta)
        print(
            f"{name:<24} " + "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in diffs.items())
        )
        worst = max([worst] + [v for k, v in diffs.items() if k.endswith("max_abs")])
        if any(v for k, v in diffs.items() if k.endswith("mismatches")):
            worst = float("inf")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"worst max-abs difference {worst:.3g} (tolerance {TOLERANCE})")
    raise SystemExit(0 if worst <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
