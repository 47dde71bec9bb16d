"""Ordered, bounded thread parallelism for vectorised work (Arrow, shapely and numpy release the GIL)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """``fn`` over ``items`` on ``threads`` threads; results in input order, at most ``threads + 1``
    items in flight (so memory stays bounded however many items there are)."""
    if threads <= 1:
        yield from map(fn, items)
        return
    it = iter(items)
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future[R]] = deque()
        try:
            while True:
                while len(pending) < threads + 1 and (item := next(it, _END)) is not _END:
                    pending.append(pool.submit(fn, item))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


_END = object()
