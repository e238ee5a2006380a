"""The queue that turns concurrent requests into inference batches.

Requests put their sequences in one FIFO queue. A single loop takes a window of queued
sequences (at most ``max_batch_size`` of them and ``max_batch_tokens`` tokens, after letting
requests already received join, and waiting ``wait_s`` for more when asked to), sorts it by
length, cuts it into calls whose padded size fits the token budget, and runs them in one
worker thread, never on the event loop. While a call runs, the next window fills: that is
where batches come from under load.

The queue is bounded both in requests and in tokens; a request that does not fit is refused
at once (:class:`QueueFull`, HTTP 429) instead of waiting without bound. A request whose client
goes away is cancelled: its sequences leave the queue and its capacity is freed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds too many requests or tokens; ``retry_after`` is a guess in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class _Job:
    seqs: Sequence[Any]
    lengths: list[int]
    tokens: int
    future: asyncio.Future[np.ndarray]
    enqueued: float
    out: np.ndarray
    pending: deque[int]
    remaining: int
    started: bool = False
    done: bool = False


@dataclass
class _Stats:
    """Moving estimate of inference throughput, for ``Retry-After``."""

    tokens_per_s: float = 0.0
    history: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=32))

    def add(self, tokens: int, seconds: float) -> None:
        self.history.append((tokens, seconds))
        total_s = sum(s for _, s in self.history)
        self.tokens_per_s = sum(t for t, _ in self.history) / total_s if total_s else 0.0


class Batcher:
    """Batch sequences from concurrent requests by token budget and run them off the loop.

    Args:
        run: embeds a list of sequences in one call → float32 ``[n, dim]``; called in the
            worker thread only.
        length: a sequence's token count.
        dim: width of ``run``'s rows.
        max_batch_tokens: padded tokens per call (longest sequence x count).
        max_batch_size: sequences per call and per window.
        wait_s: how long to wait for more requests before a window runs.
        max_requests, max_tokens: queue bounds (waiting or running).
        single_sequence: run each sequence alone (results independent of batch mates for
            graphs with per-call activation scales).
        metrics: a :class:`~qwen3emb.serve.metrics.ServerMetrics`, or None.
    """

    def __init__(self, run: Callable[[list[Any]], np.ndarray], length: Callable[[Any], int], *,
                 dim: int, max_batch_tokens: int, max_batch_size: int, wait_s: float,
                 max_requests: int, max_tokens: int, single_sequence: bool = False,
                 metrics: Any = None) -> None:
        self._run, self._length, self.dim = run, length, dim
        self.max_batch_tokens, self.max_batch_size = max_batch_tokens, max_batch_size
        self.wait_s, self.single_sequence = wait_s, single_sequence
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self.metrics = metrics
        self._jobs: deque[_Job] = deque()
        self._requests = 0
        self._tokens = 0
        self._wake = asyncio.Event()
        self._stats = _Stats()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the batching loop and the worker thread (inside the running event loop)."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="qwen3emb-infer")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def close(self) -> None:
        """Stop the loop; a call already running in the worker thread finishes first."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in list(self._jobs):
            self._finish(job, error=RuntimeError("the server is shutting down"))
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    # --- requests -------------------------------------------------------------------------
    @property
    def depth(self) -> tuple[int, int]:
        """Requests and tokens waiting or running."""
        return self._requests, self._tokens

    async def run_direct(self, seqs: list[Any]) -> np.ndarray:
        """Run ``seqs`` in the worker thread now, outside the queue (warm-up)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, seqs)

    async def embed(self, seqs: Sequence[Any]) -> np.ndarray:
        """Queue one request's sequences and wait for their rows, in order.

        Raises:
            QueueFull: the queue has no room for this request now.
            asyncio.CancelledError: the caller was cancelled; the work is dropped.
            Exception: whatever ``run`` raised for a batch holding these sequences.
        """
        lengths = [self._length(s) for s in seqs]
        tokens = sum(lengths)
        if self._requests + 1 > self.max_requests or self._tokens + tokens > self.max_tokens:
            raise QueueFull(f"the queue is full ({self._requests} requests, {self._tokens} "
                            "tokens waiting); retry later", self._retry_after(tokens))
        loop = asyncio.get_running_loop()
        job = _Job(seqs, lengths, tokens, loop.create_future(), time.perf_counter(),
                   np.empty((len(seqs), self.dim), np.float32), deque(range(len(seqs))),
                   len(seqs))
        self._requests += 1
        self._tokens += tokens
        self._jobs.append(job)
        self._gauge()
        self._wake.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            if not job.done:
                job.pending.clear()
                self._finish(job, cancelled=True)
            raise

    def _retry_after(self, tokens: int) -> int:
        rate = self._stats.tokens_per_s
        if rate <= 0:
            return 1
        return max(1, min(60, math.ceil((self._tokens + tokens) / rate)))

    def _finish(self, job: _Job, *, error: BaseException | None = None,
                cancelled: bool = False) -> None:
        if job.done:
            return
        job.done = True
        self._requests -= 1
        self._tokens -= job.tokens
        try:
            self._jobs.remove(job)
        except ValueError:
            pass
        if cancelled:
            if self.metrics is not None:
                self.metrics.cancelled.inc()
        elif not job.future.done():
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(job.out)
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_requests.set(self._requests)
            self.metrics.queue_tokens.set(self._tokens)

    # --- the loop -------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if not any(job.pending for job in self._jobs):
                self._wake.clear()
                continue
            # Let requests already received join; optionally wait for stragglers.
            await asyncio.sleep(self.wait_s if self.wait_s > 0 and not self._full() else 0)
            window = self._take_window()
            if not window:
                continue
            now = time.perf_counter()
            for job, _ in window:
                if not job.started:
                    job.started = True
                    if self.metrics is not None:
                        self.metrics.queue_seconds.observe(now - job.enqueued)
            calls = self._plan(window)
            try:
                results = await loop.run_in_executor(
                    self._executor, self._run_calls, [[job.seqs[i] for job, i in call]
                                                      for call in calls])
            except Exception as e:  # a failed call fails its requests, not the server
                logger.exception("inference failed")
                for job in {id(job): job for job, _ in window}.values():
                    self._finish(job, error=e)
                continue
            for call, rows in zip(calls, results):
                for (job, i), row in zip(call, rows):
                    if job.done:
                        continue  # cancelled while running
                    job.out[i] = row
                    job.remaining -= 1
                    if job.remaining == 0:
                        self._finish(job)

    def _full(self) -> bool:
        count = tokens = 0
        for job in self._jobs:
            count += len(job.pending)
            tokens += sum(job.lengths[i] for i in job.pending)
            if count >= self.max_batch_size or tokens >= self.max_batch_tokens:
                return True
        return False

    def _take_window(self) -> list[tuple[_Job, int]]:
        """FIFO sequences up to the batch size and token budget (always at least one)."""
        window: list[tuple[_Job, int]] = []
        tokens = 0
        for job in self._jobs:
            while job.pending and len(window) < self.max_batch_size:
                length = job.lengths[job.pending[0]]
                if window and tokens + length > self.max_batch_tokens:
                    return window
                window.append((job, job.pending.popleft()))
                tokens += length
            if len(window) >= self.max_batch_size:
                break
        return window

    def _plan(self, window: list[tuple[_Job, int]]) -> list[list[tuple[_Job, int]]]:
        """Longest first, cut so that each call's padded size fits the token budget."""
        ordered = sorted(window, key=lambda ji: -ji[0].lengths[ji[1]])
        if self.single_sequence:
            return [[ji] for ji in ordered]
        calls: list[list[tuple[_Job, int]]] = []
        for ji in ordered:
            if calls:
                head = calls[-1][0][0].lengths[calls[-1][0][1]]
                if head * (len(calls[-1]) + 1) <= self.max_batch_tokens:
                    calls[-1].append(ji)
                    continue
            calls.append([ji])
        return calls

    def _run_calls(self, calls: list[list[Any]]) -> list[np.ndarray]:
        """Worker thread: run each call, timing it."""
        out = []
        for seqs in calls:
            lengths = [self._length(s) for s in seqs]
            start = time.perf_counter()
            rows = np.asarray(self._run(seqs), dtype=np.float32)
            seconds = time.perf_counter() - start
            self._stats.add(sum(lengths), seconds)
            if self.metrics is not None:
                self.metrics.inference_seconds.observe(seconds)
                self.metrics.batch_size.observe(len(seqs))
                self.metrics.batch_tokens.observe(max(lengths) * len(seqs))
            out.append(rows)
        return out
