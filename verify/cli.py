"""faceverify command line. Thin Typer commands: options are `Annotated`, the docstring is the help,
exit codes are for scripts (0 ok, 1 negative answer, 2 error). The only module importing both
`verify` and `index`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Face verification: is this photo me?")
train_app = typer.Typer(no_args_is_help=True, help="Train a stage: attributes (stage 1) or identity (stage 2).")
app.add_typer(train_app, name="train")

EXIT_OK, EXIT_NO, EXIT_ERROR = 0, 1, 2


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(EXIT_ERROR)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    from .runtime import setup_logging

    setup_logging(verbose)


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (configs/*.yaml).")]
DataOpt = Annotated[Optional[list[Path]], typer.Option("--data", help="CelebA root(s); repeat to combine.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Run folder.")]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", help="Number of epochs.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda")]
MaxImagesOpt = Annotated[Optional[int], typer.Option("--max-images", help="Use only the first N annotated images.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")]


def _run_training(task: str, config, data, out, epochs, device, max_images, resume, sets, extra=None) -> None:
    from .config import ConfigError, load_config, parse_overrides
    from .train import TrainingDiverged, fit

    try:
        overrides = {"task": task, "out": str(out) if out else None, "optim.epochs": epochs, "device": device,
                     "data.max_images": max_images, **(extra or {})}
        if data:
            overrides["data.roots"] = [str(d) for d in data]
        overrides.update(parse_overrides(sets))
        cfg = load_config(config, overrides)
        if cfg.task != task:
            _fail(f"{config}: config is for task {cfg.task!r}, not {task!r}")
        result = fit(cfg, resume=resume)
    except TrainingDiverged as e:
        _fail(str(e))
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        _fail(str(e))
    best = result.best or {}
    typer.echo(f"run folder: {result.run_dir}")
    if task == "attributes" and best:
        t = best["test"]
        typer.echo(
            f"best epoch {best['epoch']}: test mean accuracy {t['mean_accuracy']:.4f} vs majority baseline "
            f"{t['best_constant_mean_accuracy']:.4f} ({t['images']} images of partition 2)"
        )
    elif best:
        t = best["test"]
        typer.echo(f"best epoch {best['epoch']}: test AUC {t['auc']:.4f}, EER {t['eer']:.4f}, accuracy {t['accuracy']:.4f}")
        typer.echo(f"model: {result.run_dir / 'model.pt'}")


@train_app.command("attributes")
def train_attributes(
    config: ConfigOpt = Path("configs/attributes.yaml"),
    data: DataOpt = None,
    out: OutOpt = None,
    epochs: EpochsOpt = None,
    device: DeviceOpt = None,
    max_images: MaxImagesOpt = None,
    resume: ResumeOpt = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override any config key: section.key=value.")] = None,
) -> None:
    """Stage 1: learn CelebA's 40 attributes (multi-label, BCE with logits)."""
    _run_training("attributes", config, data, out, epochs, device, max_images, resume, set_)


@train_app.command("identity")
def train_identity(
    config: ConfigOpt = Path("configs/identity.yaml"),
    init: Annotated[Optional[str], typer.Option("--init", help="Stage-1 run folder or checkpoint.")] = None,
    data: DataOpt = None,
    out: OutOpt = None,
    epochs: EpochsOpt = None,
    device: DeviceOpt = None,
    max_images: MaxImagesOpt = None,
    resume: ResumeOpt = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override any config key: section.key=value.")] = None,
) -> None:
    """Stage 2: learn an L2-normalised face embedding from CelebA identities (P x K triplets)."""
    _run_training("identity", config, data, out, epochs, device, max_images, resume, set_,
                  extra={"identity.init": init})


def main() -> None:
    app()


if __name__ == "__main__":
    main()
