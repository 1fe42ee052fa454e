"""``scopecast train`` (``scopecast export`` is in engines.offline.cli). torch is imported only
when it runs, so the ``scopecast`` command works on machines installed without the ``train``
extra."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from calibration.errors import MissingExtra, user_mistakes

err = Console(stderr=True, soft_wrap=True)


def need_torch() -> None:
    try:
        import safetensors  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise MissingExtra(
            f"training needs the train extra ({e.name} is missing): "
            "pip install -c requirements-lock.txt -e '.[train]'"
        ) from None


@contextmanager
def training_bar(name: str, total: int, done: int = 0) -> Iterator[Callable[[Any], None]]:
    """A progress bar on stderr for a training run; yields the trainer's progress callback."""
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=err, transient=True,
    )  # fmt: skip
    with bar:
        task = bar.add_task(name, total=total, completed=done, status="")

        def show(p: Any) -> None:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in list(p.losses.items())[:4])
            best = (
                f"  best PSNR {p.val_psnr:.2f} dB"
                if p.val_psnr not in (None, float("-inf"))
                else ""
            )
            bar.update(task, completed=p.step, status=f"{p.phase}  {shown}{best}")

        yield show


def train(
    config: Annotated[Path, typer.Argument(help="training config (YAML), see engines/zoo/configs")],
    out: Annotated[Path | None, typer.Option(help="run folder (default: runs/train/NAME)")] = None,
    resume: Annotated[
        bool, typer.Option(help="continue the run in --out where it stopped")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Train a generator: pre-train, then the discriminator, then the adversarial game.

    Writes checkpoints (safetensors), log.jsonl and samples.png into the run folder; export
    the best checkpoint with `scopecast export RUN/best.safetensors --out ENGINE_DIR`.
    """
    need_torch()
    from .config import load_config
    from .loop import Trainer

    with user_mistakes(ValueError):  # the data and loss checks raise plain ValueError
        cfg = load_config(config)
        run = out or Path("runs/train") / cfg.name
        trainer = Trainer(cfg, run, resume=resume)
    with training_bar(cfg.name, cfg.schedule.total, trainer.step) as show:
        summary = trainer.run(show)
    if as_json:
        print(json.dumps(summary), flush=True)
        return
    first, best = summary["first"], summary["best"]
    err.print(
        f"{summary['steps']} steps{' (stopped early)' if summary['stopped_early'] else ''}; "
        f"validation PSNR {first.get('val_psnr', float('nan')):.2f} -> {best['psnr']:.2f} dB, "
        f"SSIM {first.get('val_ssim', float('nan')):.3f} -> {best.get('ssim', float('nan')):.3f}"
        f" (best at step {best.get('step')})\nbest checkpoint: {run / 'best.safetensors'}",
        highlight=False,
    )
