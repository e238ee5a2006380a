"""The batcher on its own: windows, token budget, queue bounds, cancellation, failures.

``run`` here is a plain function of the sequences (each sequence is its token count; a row
holds that count and the size of the call it ran in), so what ran together is visible.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from qwen3emb.serve.batcher import Batcher, QueueFull  # noqa: E402


def _batcher(calls: list[list[int]], **kw: object) -> Batcher:
    def run(seqs: list[int]) -> np.ndarray:
        calls.append(list(seqs))
        return np.array([[s, len(seqs)] for s in seqs], dtype=np.float32)

    options = dict(dim=2, max_batch_tokens=100, max_batch_size=8, wait_s=0.05,
                   max_requests=10, max_tokens=1000)
    options.update(kw)
    return Batcher(run, lambda s: s, **options)  # type: ignore[arg-type]


def test_concurrent_requests_share_calls_within_the_token_budget() -> None:
    calls: list[list[int]] = []

    async def main() -> list[np.ndarray]:
        batcher = _batcher(calls)
        batcher.start()
        try:
            return list(await asyncio.gather(batcher.embed([30, 5]), batcher.embed([40]),
                                             batcher.embed([10, 10, 10])))
        finally:
            await batcher.close()

    first, second, third = asyncio.run(main())
    np.testing.assert_array_equal(first[:, 0], [30, 5])  # rows come back in request order
    np.testing.assert_array_equal(second[:, 0], [40])
    assert sorted(s for call in calls for s in call) == [5, 10, 10, 10, 30, 40]
    for call in calls:
        assert call == sorted(call, reverse=True)  # longest first: little padding
        assert max(call) * len(call) <= 100  # padded size within the budget
    assert len(calls) < 6


def test_single_sequence_runs_each_sequence_alone() -> None:
    calls: list[list[int]] = []

    async def main() -> np.ndarray:
        batcher = _batcher(calls, single_sequence=True)
        batcher.start()
        try:
            return await batcher.embed([3, 4, 5])
        finally:
            await batcher.close()

    rows = asyncio.run(main())
    assert rows[:, 1].tolist() == [1, 1, 1] and sorted(map(len, calls)) == [1, 1, 1]


@pytest.mark.parametrize("kw, sizes", [
    ({"max_requests": 1}, [[1], [1]]),
    ({"max_tokens": 50}, [[30], [30]]),
])
def test_queue_bounds_refuse_with_retry_after(kw: dict, sizes: list[list[int]]) -> None:
    async def main() -> None:
        batcher = _batcher([], **kw)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.embed(sizes[0]))
            await asyncio.sleep(0)
            with pytest.raises(QueueFull) as info:
                await batcher.embed(sizes[1])
            assert info.value.retry_after >= 1 and "the queue is full" in str(info.value)
            await first
            assert batcher.depth == (0, 0)
            await batcher.embed(sizes[1])  # room again
        finally:
            await batcher.close()

    asyncio.run(main())


def test_a_cancelled_request_leaves_the_queue_and_frees_capacity() -> None:
    calls: list[list[int]] = []

    async def main() -> None:
        batcher = _batcher(calls, wait_s=0.2, max_requests=1)
        batcher.start()
        try:
            task = asyncio.ensure_future(batcher.embed([7, 8]))
            await asyncio.sleep(0.05)  # queued, the batcher still waiting for mates
            assert batcher.depth == (1, 15)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert batcher.depth == (0, 0)
            await asyncio.sleep(0.3)
            assert calls == []  # its sequences never ran
            assert (await batcher.embed([9]))[0, 0] == 9
        finally:
            await batcher.close()

    asyncio.run(main())


def test_a_failing_call_fails_its_requests_and_the_batcher_goes_on() -> None:
    def run(seqs: list[int]) -> np.ndarray:
        if 13 in seqs:
            raise ValueError("unlucky batch")
        return np.ones((len(seqs), 2), dtype=np.float32)

    async def main() -> None:
        batcher = Batcher(run, lambda s: s, dim=2, max_batch_tokens=100, max_batch_size=8,
                          wait_s=0, max_requests=10, max_tokens=1000)
        batcher.start()
        try:
            with pytest.raises(ValueError, match="unlucky"):
                await batcher.embed([13])
            assert (await batcher.embed([2])).shape == (1, 2)
            assert batcher.depth == (0, 0)
        finally:
            await batcher.close()

    asyncio.run(main())
