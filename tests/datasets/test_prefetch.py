"""Read-ahead iterator: same items in the same order, bounded look-ahead, errors surface where they happened."""
import threading
import time

import pytest

from dist_egnn.datasets.prefetch import prefetch


def test_items_arrive_in_order_for_every_depth():
    for depth in (0, 1, 3):
        assert list(prefetch(iter(range(20)), depth)) == list(range(20))


def test_reads_happen_in_another_thread_ahead_of_the_consumer():
    read_by = []

    def source():
        for i in range(4):
            read_by.append(threading.current_thread().name)
            yield i

    items = prefetch(source(), depth=2)
    assert next(items) == 0
    deadline = time.monotonic() + 5
    while len(read_by) < 3 and time.monotonic() < deadline:      # items 1 and 2 are read without being asked
        time.sleep(0.01)
    assert len(read_by) >= 3 and set(read_by) == {"prefetch"}
    assert list(items) == [1, 2, 3]


def test_look_ahead_is_bounded_by_depth():
    produced = []

    def source():
        for i in range(100):
            produced.append(i)
            yield i

    items = prefetch(source(), depth=2)
    next(items)
    time.sleep(0.3)
    assert len(produced) <= 1 + 2 + 1           # consumed + queued + the one waiting to be queued
    items.close()


def test_error_while_reading_is_raised_at_its_batch():
    def source():
        yield 1
        yield 2
        raise OSError("chunk 7 of pos is truncated")

    items = prefetch(source(), depth=2)
    assert next(items) == 1 and next(items) == 2
    with pytest.raises(OSError, match="chunk 7"):
        next(items)


def test_leaving_early_stops_the_thread():
    def source():
        i = 0
        while True:
            yield i
            i += 1

    items = prefetch(source(), depth=2)
    assert next(items) == 0
    items.close()
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name == "prefetch" and t.is_alive()]


def test_negative_depth_is_refused():
    with pytest.raises(ValueError, match="dataset.prefetch"):
        list(prefetch(iter([1]), -1))
