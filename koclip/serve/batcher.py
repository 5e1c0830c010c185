"""Micro-batching: queries that arrive together are embedded in one encoder call.

Each request puts its text (or its preprocessed pixels) on an asyncio queue and awaits a future.
One task takes the first waiting query, waits at most `max_wait` seconds for more (up to
`max_batch`), and runs the texts of that batch in one call and the images in another, on the
model's one thread. While a batch runs, the next one gathers, so under load batches fill without
waiting. The encoders pad every batch to their fixed batch size (koclip.encoders), so a batch of
one costs as much as a full one: that is what batching wins back.

The same batcher batches the index searches (app.py): a query's vector goes on a second queue,
keyed by what it searches (the index version, the number of candidates, the filters), and a batch
of one key is one FAISS search of all its vectors on the index thread. A flat search reads the
whole index from memory once per call, whatever the number of queries, so 8 queries cost about
what 1 does (docs/serve.md). `kind` is any hashable key: the entries of a batch are grouped by it
(texts before images, other keys in arrival order) and each group is one call.

With batching off (`Direct`), each query is one encoder call on the same thread, in arrival order.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger("koclip.serve")

EmbedBatch = Callable[[str, list], np.ndarray]  # (kind "text" | "image", items) -> float32 [N, D]
KIND_ORDER = {"text": 0, "image": 1}  # a batch's texts are embedded before its images


def groups(batch: list[tuple]) -> list[tuple[object, list[tuple]]]:
    """The entries (kind, item, future) of a batch grouped by kind: texts, images, then other kinds
    in the order they first came."""
    by_kind: dict = {}
    for entry in batch:
        by_kind.setdefault(entry[0], []).append(entry)
    return sorted(by_kind.items(), key=lambda kv: KIND_ORDER.get(kv[0], 2) if isinstance(kv[0], str) else 2)


class Direct:
    """No batching: one encoder call per query."""

    def __init__(self, embed: EmbedBatch, executor: ThreadPoolExecutor, on_batch: Callable[[int], None]):
        self.embed, self.executor, self.on_batch = embed, executor, on_batch

    async def submit(self, kind: str, item) -> np.ndarray:
        vectors = await asyncio.get_running_loop().run_in_executor(self.executor, self.embed, kind, [item])
        self.on_batch(1)
        return vectors[0]

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


class MicroBatcher:
    """Batches concurrent queries (module docstring)."""

    def __init__(self, embed: EmbedBatch, executor: ThreadPoolExecutor, on_batch: Callable[[int], None],
                 max_batch: int, max_wait: float):
        self.embed, self.executor, self.on_batch = embed, executor, on_batch
        self.max_batch, self.max_wait = max_batch, max_wait
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._full: asyncio.Event | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._full = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="koclip-micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, kind: str, item) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((kind, item, future))
        if self._queue.qsize() >= self.max_batch - 1:  # with the one _gather holds, a full batch
            self._full.set()
        return await future

    async def _gather(self) -> list[tuple]:
        """The next batch: the first waiting query, and those that come within max_wait (at most
        max_batch). It waits on an event, never on queue.get() under a timeout, whose cancellation
        could drop a query."""
        batch = [await self._queue.get()]
        if self.max_wait > 0 and self._queue.qsize() < self.max_batch - 1:
            self._full.clear()
            try:
                await asyncio.wait_for(self._full.wait(), self.max_wait)
            except asyncio.TimeoutError:
                pass
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [entry for entry in await self._gather() if not entry[2].done()]  # timed-out ones are skipped
            for kind, entries in groups(batch):
                try:
                    vectors = await loop.run_in_executor(self.executor, self.embed, kind, [e[1] for e in entries])
                except Exception as e:  # the batch's requests get the error; the batcher goes on
                    log.exception("a batch of %d (%s) failed", len(entries), kind)
                    for _, _, future in entries:
                        if not future.done():
                            future.set_exception(e)
                    continue
                self.on_batch(len(entries))
                for (_, _, future), vector in zip(entries, vectors):
                    if not future.done():
                        future.set_result(vector)
