"""Read ahead: run any iterator in a background thread so the next batches are ready before they are asked for.

    for batch in prefetch(dataset.batches(batch_size, shuffle=True, seed=seed, epoch=epoch), depth=2):
        step(batch)

While the caller works on batch k, the thread reads batches k+1 .. k+depth. Reading a batch is mostly
zarr decompression and cKDTree pair search, both of which release the GIL, so it overlaps a training step
that runs in torch kernels. Memory: at most ``depth`` batches wait in the queue, plus the one being read.

The order of batches is the source iterator's order; prefetching changes only when they are read.
An exception raised while reading is re-raised in the caller at the batch where it happened. Leaving the
loop early (``break``, an exception in the caller, garbage collection) stops the thread after the batch it
is reading.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

from dist_egnn.errors import ConfigError

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(source: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield the items of ``source`` in order, reading up to ``depth`` items ahead in a background thread.

    ``depth`` 0 reads in the caller's thread (no prefetching).
    """
    if depth < 0:
        raise ConfigError(f"prefetch depth must be >= 0, got {depth} (dataset.prefetch)")
    if depth == 0:
        yield from source
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        """Block until there is room (or the consumer left); False when the consumer left."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(_Failure(err))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=60)
