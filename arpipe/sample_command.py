"""``arpipe sample``: images from a trained checkpoint folder or a registered model, offline."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from arpipe.project import root as _root
from arpipe.project import setup_env as _setup_env


def _class_ids(spec: str, class_names: list[str]) -> list[int]:
    """'3,7' -> [3, 7]: each item is a class name from the checkpoint, or else a class index."""
    ids = []
    for item in (part.strip() for part in spec.split(",")):
        if item in class_names:
            ids.append(class_names.index(item))
        elif item.isdigit() and int(item) < len(class_names):
            ids.append(int(item))
        else:
            raise click.BadParameter(
                f"unknown class {item!r}; the checkpoint has {len(class_names)} classes: {', '.join(class_names)}",
                param_hint="--classes",
            )
    return ids


@click.command()
@click.option(
    "--checkpoint",
    type=click.Path(file_okay=False, path_type=Path),
    help="AR model folder (model.safetensors + config.json) written by pretrain or a later stage "
    "[default: data/models/base].",
)
@click.option(
    "--model",
    "registered",
    metavar="ALIAS|URI",
    help="Sample from the MLflow registry instead: an alias of an arpipe-<arch> model (champion, "
    "candidate) or a models:/ URI. Loads the registered pyfunc, offline.",
)
@click.option(
    "--tokenizer",
    "tokenizer_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Tokenizer folder the model was trained on (default: params.yaml paths.tokenizer).",
)
@click.option("--classes", default=None, help="Comma-separated class names or indices (default: every class).")
@click.option(
    "--n",
    "per_class",
    default=8,
    show_default=True,
    help="Samples per class (one grid row per class); with --npz the total number of samples.",
)
@click.option(
    "--cfg-scale", default=1.0, show_default=True, help="Guidance scale: logits = u + cfg_scale*(c - u); 1 = none."
)
@click.option(
    "--guidance-schedule",
    type=click.Choice(["auto", "constant", "linear"]),
    default="auto",
    show_default=True,
    help="Spread of --cfg-scale over the sampling steps: constant, or linear from 1 at the first step to "
    "--cfg-scale at the last (VAR's ramp: its own cfg 1.5 is --cfg-scale 2.5); auto = the family's authors' "
    "(gpt constant, var linear).",
)
@click.option("--temperature", default=1.0, show_default=True, help="Softmax temperature (0 = greedy).")
@click.option("--top-k", default=0, show_default=True, help="Keep the k most likely tokens (0 = off).")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus mass to keep (1.0 = off).")
@click.option("--seed", default=0, show_default=True, help="Sampling seed; the same seed gives the same images.")
@click.option(
    "--steps",
    type=click.Choice(["1", "2"]),
    default="1",
    show_default=True,
    help="Distilled student only (data/models/distilled): one- or two-step sampling. Its teacher's guidance "
    "is baked in, so --cfg-scale/--temperature/--top-k/--top-p do not apply to it.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("samples.png"),
    show_default=True,
    help="PNG file to write.",
)
@click.option(
    "--npz",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write an ADM sample batch instead of a grid (uint8 NHWC arr_0, labels arr_1) for the standard "
    "evaluator: --n samples in total, the classes in turn, e.g. --n 50000 --batch 250.",
)
@click.option("--batch", default=64, show_default=True, help="Images sampled per forward batch.")
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="torch.compile each sampling step (a static KV cache for gpt, a graph per scale for var): the same "
    "images; pays on a GPU for many batches, after a first batch that compiles (tens of seconds).",
)
def sample(
    checkpoint, registered, tokenizer_dir, classes, per_class, cfg_scale, guidance_schedule, temperature, top_k, top_p,
    seed, steps, out, npz, batch, compile_,
) -> None:  # fmt: skip
    """Sample a grid of images from a trained AR model: one row per class, offline, on CPU or GPU."""
    import torch

    if registered:
        if checkpoint is not None:
            raise click.UsageError("give --checkpoint FOLDER or --model ALIAS|URI, not both")
        _sample_registered(registered, classes, per_class, cfg_scale, seed, out)
        return
    checkpoint = checkpoint or Path("data/models/base")
    if not checkpoint.is_dir():
        raise click.BadParameter(
            f"folder {checkpoint} does not exist (run pretrain first, or pass an AR model folder)",
            param_hint="--checkpoint",
        )

    from core.checkpoint import read_checkpoint, teacher_cfg_scale
    from core.images import image_grid, save_png
    from models.ar import ar_from_state, sample_images, tokenizer_from_state

    if tokenizer_dir is None:
        from core.config import load_paths, read_params

        tokenizer_dir = Path(load_paths(read_params(_root() / "params.yaml")).tokenizer)
    try:
        state, config = read_checkpoint(checkpoint)
        tok_state, tok_config = read_checkpoint(tokenizer_dir, stage="train_tokenizer")
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if "token_layout" in config and "codebook_size" in config and "arch" not in config:
        raise click.BadParameter(
            f"{checkpoint} is a tokenizer (written by train_tokenizer), not an AR model: pass an AR model folder "
            f"(e.g. data/models/base) as --checkpoint, and this folder as --tokenizer",
            param_hint="--checkpoint",
        )
    if config.get("tokenizer_fingerprint") != tok_config["fingerprint"]:
        raise click.ClickException(
            f"{checkpoint} was trained on tokenizer {str(config.get('tokenizer_fingerprint'))[:12]}, but "
            f"{tokenizer_dir} holds {tok_config['fingerprint'][:12]}: pass the matching --tokenizer"
        )
    _refuse_unusable_options(checkpoint, config)
    ids = _class_ids(classes, config["class_names"]) if classes else list(range(len(config["class_names"])))
    tokenizer = tokenizer_from_state(tok_state, tok_config)
    labels = torch.tensor(ids).repeat_interleave(per_class)
    names = ", ".join(config["class_names"][i] for i in ids)
    if config.get("distilled"):
        from models.dd_student import sample_distilled_images, student_from_state

        student = student_from_state(state, config, tokenizer)

        def draw(labels_N, first_batch=0):
            return sample_distilled_images(student, tokenizer, labels_N, steps=int(steps), seed=seed,
                                           batch_size=batch, first_batch=first_batch).numpy()  # fmt: skip

        if npz:
            _write_sample_batch(npz, draw, ids, per_class, batch, seed, tok_config["image_size"])
            return
        images = draw(labels)
        save_png(image_grid(images, per_class), out)
        teacher = config.get("teacher", {})
        scale = teacher_cfg_scale(teacher) if teacher else "?"
        click.echo(
            f"wrote {out}: {len(images)} samples ({per_class} per class: {names}), distilled student, "
            f"{steps}-step (teacher {teacher.get('name', '?')} at cfg_scale {scale})"
        )
        return
    model = ar_from_state(state, config, tokenizer)
    if torch.cuda.is_available():
        model, tokenizer = model.cuda(), tokenizer.cuda()
    from models.sampling import guidance_per_step

    guidance = guidance_per_step(cfg_scale, guidance_schedule, arch=config["arch"], steps=model.steps)

    def draw(labels_N, first_batch=0):
        return sample_images(model, tokenizer, labels_N, cfg_scale=guidance, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed, batch_size=batch, first_batch=first_batch,
                             compiled=compile_).numpy()  # fmt: skip

    if npz:
        _write_sample_batch(npz, draw, ids, per_class, batch, seed, tok_config["image_size"])
        return
    images = draw(labels)
    save_png(image_grid(images, per_class), out)
    click.echo(f"wrote {out}: {len(images)} samples ({per_class} per class: {names}), cfg_scale {cfg_scale}")


def _write_sample_batch(path: Path, draw, ids: list[int], count: int, batch: int, seed: int, side: int) -> None:
    """``count`` samples, the classes ``ids`` in turn (shuffled by ``seed``), drawn ``batch`` at a
    time (batch b seeded as one long run would seed it) into an ADM ``.npz``."""
    import numpy as np
    import torch

    from core.progress import progress
    from core.reference_batch import NpzSampleWriter

    if count < 1 or batch < 1:
        raise click.BadParameter("--n and --batch must be >= 1 with --npz", param_hint="--n")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor(ids)[torch.arange(count) % len(ids)][order]
    writer = NpzSampleWriter(path, count, side, side)
    for b, start in progress(list(enumerate(range(0, count, batch))), desc="sample", unit="batch"):
        chunk = labels[start : start + batch]
        writer.add(draw(chunk, first_batch=b), chunk.numpy().astype(np.int64))
    writer.close()
    click.echo(f"wrote {path}: {count} samples of {len(ids)} classes as an ADM sample batch (arr_0 uint8 NHWC, "
               f"arr_1 labels)")  # fmt: skip


def _refuse_unusable_options(checkpoint: Path, config: dict) -> None:
    """Options given on the command line that this checkpoint cannot use fail instead of being ignored:
    the distilled student has its teacher's guidance and sampling baked in; only it has --steps."""
    from click.core import ParameterSource

    from core.checkpoint import teacher_cfg_scale

    ctx = click.get_current_context()
    given = {
        name
        for name in ("cfg_scale", "guidance_schedule", "temperature", "top_k", "top_p", "compile_", "steps")
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
    }
    if config.get("distilled"):
        defaults = {"cfg_scale": 1.0, "guidance_schedule": "auto", "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                    "compile_": False}  # fmt: skip
        unusable = [name for name in defaults if name in given and ctx.params[name] != defaults[name]]
        if unusable:
            teacher = config.get("teacher", {})
            flags = ", ".join("--" + name.strip("_").replace("_", "-") for name in unusable)
            raise click.BadParameter(
                f"{checkpoint} is a distilled student: its teacher's guidance "
                f"(cfg_scale {teacher_cfg_scale(teacher) if teacher else '?'}) and "
                f"sampling are baked in, so {flags} cannot apply; drop {flags} (choose --steps 1 or 2)",
                param_hint=flags,
            )
    elif "steps" in given:
        raise click.BadParameter(
            f"{checkpoint} is not a distilled student: --steps applies only to data/models/distilled "
            f"(this model takes {config.get('arch', 'its')} sampling options --cfg-scale, --temperature, --top-k, "
            "--top-p)",
            param_hint="--steps",
        )


def _registered_uri(alias_or_uri: str) -> str:
    """'champion' -> models:/arpipe-<arch>@champion (exactly one arpipe model must carry the alias)."""
    if alias_or_uri.startswith("models:/"):
        return alias_or_uri
    from mlflow import MlflowClient

    client = MlflowClient()
    names = [m.name for m in client.search_registered_models("name LIKE 'arpipe-%'") if alias_or_uri in m.aliases]
    if len(names) != 1:
        found = ", ".join(names) or "none"
        raise click.ClickException(
            f"alias {alias_or_uri!r} is on {found} of the arpipe models: pass models:/<name>@{alias_or_uri}"
            if names
            else f"no arpipe-* registered model has alias {alias_or_uri!r}: run the evaluate stage first"
        )
    return f"models:/{names[0]}@{alias_or_uri}"


@contextlib.contextmanager
def _without_type_hint_warning():
    """MLflow warns, when it loads a sampler registered before ``predict`` had type hints (the
    model's code is stored with it), that it has none: nothing a user can act on. MLflow forces its
    own filter inside, so the message is dropped at display instead; every other warning shows."""
    import warnings

    with warnings.catch_warnings():
        show = warnings.showwarning

        def filtered(message, *args, **kwargs):
            if "Add type hints to the `predict` method" not in str(message):
                show(message, *args, **kwargs)

        warnings.showwarning = filtered
        yield


def _sample_registered(alias_or_uri: str, classes, per_class: int, cfg_scale: float, seed: int, out: Path) -> None:
    import mlflow
    import pandas as pd

    from core.images import image_grid, save_png

    _setup_env(_root())
    uri = _registered_uri(alias_or_uri)
    with _without_type_hint_warning():
        model = mlflow.pyfunc.load_model(uri)
    names = classes.split(",") if classes else None
    if names is None:
        names = list(range(len(model.unwrap_python_model().class_names)))
    labels = [name for name in names for _ in range(per_class)]
    schema = model.metadata.get_input_schema()
    # a model registered before the rename takes its guidance scale as column "cfg"
    scale_column = "cfg" if schema is not None and "cfg" in schema.input_names() else "cfg_scale"
    try:
        images = model.predict(pd.DataFrame({"label": labels, scale_column: cfg_scale, "seed": seed}))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--classes") from exc
    save_png(image_grid(images, per_class), out)
    click.echo(f"wrote {out}: {len(images)} samples from {uri}, cfg_scale {cfg_scale}")
