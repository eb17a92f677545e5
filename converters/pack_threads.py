"""Threads of `pack`: how many, and an ordered map over records with a bounded number in flight.

`ordered_map` runs a function over a stream of items in worker threads (zstd, numpy, hashlib and
file writes release the GIL) and yields the results in the items' order, with at most
`max_in_flight` items (and optionally a byte budget of them) submitted and not yet yielded: memory
stays a small multiple of the largest item whatever the length of the stream. One worker means no
thread at all (the plain map).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from dsnot_deploy.errors import UserInputError

T = TypeVar("T")
R = TypeVar("R")


def available_cores() -> int:
    """Cores this process may run on: the affinity mask where the OS has one, else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """`threads` checked (an int >= 1), or every available core for None."""
    if threads is None:
        return available_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserInputError(f"expected --threads to be a whole number >= 1, found {threads!r}")
    return threads


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                max_in_flight: int | None = None, *, weight: Callable[[T], int] | None = None,
                budget: int | None = None) -> Iterator[R]:
    """`fn(item)` for every item, in order, computed by `workers` threads. Items are pulled from
    `items` in the calling thread; those taken and not yet yielded are bounded by their total
    `weight` <= `budget` when both are given (one item is always allowed, whatever its weight), and
    by their count `max_in_flight` (default: 2 * workers without a budget, no count bound with one).
    A weight budget lets many small items flow past one big item still being computed, where a count
    alone would stall the other workers behind it. An exception of `fn` is raised here, at its
    item's turn; the items not started yet are then cancelled."""
    if workers <= 1:
        yield from map(fn, items)
        return
    weigh = weight if budget is not None else None
    if max_in_flight is None:
        max_in_flight = None if weigh is not None else 2 * workers
    limit = max(workers, max_in_flight) if max_in_flight is not None else None
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pack")
    pending: deque[tuple[Future[R], int]] = deque()
    held = 0

    def oldest() -> R:
        nonlocal held
        fut, w = pending.popleft()
        held -= w
        return fut.result()

    try:
        for item in items:
            w = weigh(item) if weigh is not None else 0
            while pending and budget is not None and held + w > budget:
                yield oldest()
            pending.append((pool.submit(fn, item), w))
            held += w
            if limit is not None and len(pending) >= limit:
                yield oldest()
        while pending:
            yield oldest()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
