"""Group concurrent requests into one model call without making a lone request wait.

A fixed batching window (Serve's ``@serve.batch`` with a 5 ms wait) taxes the request that
arrives alone: it waits out the window for company that never comes, which made a single
client 4-5x slower than the plain server. :class:`AdaptiveBatcher` dispatches at once:
whatever is queued when the model is free goes in one call, and requests arriving while the
model runs wait for the next call. Under load the batches form by themselves (the queue fills
while the model works); alone, a request goes straight to the model. An optional extra wait
(``wait_s``) applies only when the last call already held several requests, i.e. under load.

One model call at a time per batcher (the replica's model uses its torch threads fully), so
the queue is where concurrency turns into batch size.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from typing import Any, Awaitable, Callable, Deque, List

import numpy as np

Infer = Callable[[List[np.ndarray]], Awaitable[list]]


@dataclasses.dataclass
class _Item:
    images: np.ndarray
    future: asyncio.Future


class AdaptiveBatcher:
    """Batches ``submit`` calls into calls of ``infer(list of arrays) -> list of results``
    holding at most ``max_images`` images (a larger request is one call of its own)."""

    def __init__(self, infer: Infer, max_images: int, wait_s: float = 0.0):
        self._infer = infer
        self.max_images = max_images
        self.wait_s = wait_s
        self._queue: Deque[_Item] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.calls = 0          # model calls made (for tests and metrics)
        self.last_batch = 0     # requests in the last call

    def configure(self, max_images: int | None = None, wait_s: float | None = None) -> None:
        """Change the knobs in place (Serve's reconfigure); queued requests keep their place."""
        if max_images is not None:
            self.max_images = int(max_images)
        if wait_s is not None:
            self.wait_s = float(wait_s)

    async def submit(self, images: np.ndarray) -> Any:
        """The result for ``images``: its entry of the ``infer`` call it joined."""
        if len(images) >= self.max_images:  # fills a batch alone: no reason to queue
            return (await self._call([images]))[0]
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._run())
        item = _Item(images, loop.create_future())
        self._queue.append(item)
        self._wake.set()
        return await item.future

    async def _call(self, items: List[np.ndarray]) -> list:
        self.calls += 1
        self.last_batch = len(items)
        return await self._infer(items)

    def _take(self, room: int | None = None) -> List[_Item]:
        """Queued requests up to ``room`` images (``max_images``), oldest first; cancelled
        ones dropped. The first request always fits an empty batch."""
        room = self.max_images if room is None else room
        batch: List[_Item] = []
        count = 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # its caller gave up (timeout, disconnect)
                self._queue.popleft()
                continue
            if (batch or room < self.max_images) and count + len(item.images) > room:
                break
            batch.append(self._queue.popleft())
            count += len(item.images)
        return batch

    async def _fill(self, batch: List[_Item]) -> List[_Item]:
        """Under load only: wait up to ``wait_s`` for more requests to join ``batch``."""
        deadline = time.monotonic() + self.wait_s
        while sum(len(i.images) for i in batch) < self.max_images:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wake.clear()
            if not self._queue:
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            room = self.max_images - sum(len(i.images) for i in batch)
            if self._queue and len(self._queue[0].images) > room:
                break
            batch += self._take(room)
        return batch

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            batch = self._take()
            if not batch:
                continue
            if self.wait_s > 0 and self.last_batch > 1:
                batch = await self._fill(batch)
            await self._dispatch(batch)

    async def _dispatch(self, batch: List[_Item]) -> None:
        try:
            results = await self._call([i.images for i in batch])
        except Exception as exc:  # the whole call failed: every request in it learns why
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item, result in zip(batch, results):
            if not item.future.done():
                item.future.set_result(result)
