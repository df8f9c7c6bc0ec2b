"""Progress bars that stay quiet when output is not a terminal (logs, CI)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Wrap an iterable in a tqdm bar on stderr, disabled when stderr is not a TTY."""
    return iter(tqdm(items, desc=desc, total=total, unit=unit, disable=not sys.stderr.isatty(), leave=False))


def progress_bar(
    desc: str, total: int | None = None, unit: str = "it", initial: int = 0, enabled: bool = True
) -> tqdm:
    """A manually advanced bar (call `.update(n)`), disabled when stderr is not a TTY."""
    return tqdm(
        desc=desc,
        total=total,
        unit=unit,
        initial=initial,
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
    )
