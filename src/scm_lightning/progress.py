"""Rich progress for the long loops outside training steps (FID, evaluation, ``evaluate``).

In a terminal the bar is live on stderr; elsewhere (a log file, CI) rich prints each finished
bar once, so a log still shows every stage with its count and time. During ``fit`` with
Lightning's ``RichProgressBar`` running, the stage is a task inside that live display (rich
allows one live display per terminal). Only global rank 0 shows anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

Advance = Callable[[int], None]


def _running_rich_bar(trainer: Any) -> Any | None:
    from lightning.pytorch.callbacks import RichProgressBar

    bar = getattr(trainer, "progress_bar_callback", None)
    if not isinstance(bar, RichProgressBar) or bar.is_disabled or bar.progress is None:
        return None
    return bar if bar.progress.live.is_started else None


@contextlib.contextmanager
def progress(
    description: str, total: int, trainer: Any | None = None, row: str | None = None
) -> Iterator[Advance]:
    """A progress bar of ``total`` units; yields ``advance(n)``.

    ``trainer``: inside a Lightning run, show on rank 0 only and join its RichProgressBar.
    ``row``: there, reuse one row per name (e.g. ``"fid"``: the latest evaluation stays
    shown under the training bar) instead of a row that disappears when done.
    """
    if trainer is not None and not trainer.is_global_zero:
        yield lambda n: None
        return
    bar = _running_rich_bar(trainer) if trainer is not None else None
    if bar is not None:
        bars = bar.progress
        task = next((t.id for t in bars.tasks if row and t.fields.get("row") == row), None)
        if task is None:
            task = bars.add_task(description, total=total, row=row)
        else:
            bars.reset(task, total=total, description=description)
        try:
            yield lambda n: bars.update(task, advance=n, refresh=True)
        finally:
            if row is None:
                bars.remove_task(task)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as bars:
        task = bars.add_task(description, total=total)
        yield lambda n: bars.update(task, advance=n)
