"""Progress reporting, passed down as a callback so that the math, the layer runner, the evaluation
and the converters never import a progress-bar library.

A ``progress`` argument is a factory ``(desc, total, unit, unit_scale) -> Bar`` (the CLI passes
``dsnot_deploy.cli.common.progress_for``'s tqdm bars), or False/None for none. ``True`` asks for
the default terminal bars (tqdm, imported only then), for library callers that want them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar, Union

T = TypeVar("T")


class Bar(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def close(self) -> Any: ...


ProgressFactory = Callable[..., Bar]
Progress = Union[ProgressFactory, bool, None]


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def terminal_bars(desc: str, total: int | None = None, unit: str = "it", unit_scale: bool = False) -> Bar:
    """tqdm bars on stderr (what ``progress=True`` means)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale)


def open_bar(progress: Progress, desc: str, total: int | None = None, unit: str = "it",
             unit_scale: bool = False) -> Any:
    """A bar (usable as a context manager) from ``progress``: its factory, the terminal bars for
    True, a silent one for False/None."""
    if progress is True:
        progress = terminal_bars
    if not progress:
        return _Silent()
    bar = progress(desc, total=total, unit=unit, unit_scale=unit_scale)
    return bar if hasattr(bar, "__enter__") else _Closing(bar)


class _Closing:
    def __init__(self, bar: Bar) -> None:
        self._bar = bar

    def update(self, n: int = 1) -> Any:
        return self._bar.update(n)

    def close(self) -> Any:
        return self._bar.close()

    def __enter__(self) -> _Closing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(progress: Progress, items: Iterable[T], desc: str, unit: str = "it") -> Iterator[T]:
    """Iterate ``items`` (a sized collection) with a bar of ``len(items)`` steps."""
    with open_bar(progress, desc, len(items), unit) as bar:  # type: ignore[arg-type]
        for item in items:
            yield item
            bar.update(1)
