"""Progress bars on stderr (rich), quiet when stderr is not a terminal unless asked."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        yield from bar.track(items, total=total, description=description)
    sys.stderr.flush()
