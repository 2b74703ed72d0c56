"""Ordered map over a process pool with a bounded number of items in flight.

`multiprocessing.Pool.imap` drains its input iterator as fast as it can, which would read a whole
shard into memory when workers are slower than the reader; here at most `max_pending` chunks exist
at any time, and results come back in input order.
"""

from __future__ import annotations

import collections
import multiprocessing
from typing import Callable, Iterable, Iterator, Tuple, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    initializer: Callable,
    initargs: tuple,
    max_pending: int,
) -> Iterator[Tuple[T, R]]:
    """Yield (item, fn(item)) in input order, fn running in `workers` processes."""
    # spawn: workers start clean (no inherited threads or torch state) and import only fn's module.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append((item, pool.apply_async(fn, (item,))))
            if len(pending) >= max_pending:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
