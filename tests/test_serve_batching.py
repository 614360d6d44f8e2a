"""Adaptive batching and the overload valve, Ray-free: a lone request goes to the model at
once, requests queued while the model works share the next call (each gets its own rows
back), the image bound holds, and a process at ``max_pending`` answers 503 with Retry-After
at once instead of queueing. Model calls are gated by events, never by sleeps."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from dundi.serving.batching import AdaptiveBatcher

DEADLINE_S = 10.0  # generous bound for things that must happen "at once"


class GatedModel:
    """A model stand-in: each call records its batch, then waits for ``release`` (when gated);
    each request's result is the sum of its own images (so a mixed-up row shows)."""

    def __init__(self, gated: bool = False):
        self.calls: list[list[int]] = []
        self.gated = gated
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, items: list[np.ndarray]) -> list:
        self.calls.append([len(x) for x in items])
        self.started.set()
        if self.gated:
            await self.release.wait()
        return [float(x.sum()) for x in items]


def imgs(n: int, value: float) -> np.ndarray:
    return np.full((n, 1, 2, 2), value, np.float32)


async def _within(aw, what: str):
    try:
        return await asyncio.wait_for(aw, DEADLINE_S)
    except asyncio.TimeoutError:
        raise AssertionError(f"{what} did not happen within {DEADLINE_S} s") from None


def test_a_lone_request_does_not_wait_for_company():
    """Even with a 60 s fill wait configured, a request that finds the model idle is answered
    at once, as a call of its own."""

    async def main():
        model = GatedModel()
        b = AdaptiveBatcher(model, max_images=64, wait_s=60.0)
        for i in range(3):
            assert await _within(b.submit(imgs(1, i)), f"lone request {i}") == pytest.approx(4 * i)
        assert model.calls == [[1], [1], [1]]

    asyncio.run(main())


def test_requests_queued_while_the_model_works_share_the_next_call():
    async def main():
        model = GatedModel(gated=True)
        b = AdaptiveBatcher(model, max_images=64)
        first = asyncio.ensure_future(b.submit(imgs(1, 1.0)))
        await _within(model.started.wait(), "the first model call")
        rest = [asyncio.ensure_future(b.submit(imgs(k, 10.0 + k))) for k in (1, 2, 3, 4)]
        await asyncio.sleep(0)  # let them queue
        model.release.set()
        out = await _within(asyncio.gather(first, *rest), "the batched answers")
        assert model.calls == [[1], [1, 2, 3, 4]]  # one call for the four, in arrival order
        assert out == [4.0] + [pytest.approx(4 * k * (10.0 + k)) for k in (1, 2, 3, 4)]

    asyncio.run(main())


def test_a_call_never_exceeds_max_images_and_big_requests_go_alone():
    async def main():
        model = GatedModel(gated=True)
        b = AdaptiveBatcher(model, max_images=8)
        blocker = asyncio.ensure_future(b.submit(imgs(1, 0)))
        await _within(model.started.wait(), "the first model call")
        queued = [asyncio.ensure_future(b.submit(imgs(3, 1))) for _ in range(5)]
        big = asyncio.ensure_future(b.submit(imgs(20, 1)))  # larger than a batch: its own call
        await asyncio.sleep(0)
        model.release.set()
        await _within(asyncio.gather(blocker, big, *queued), "every answer")
        assert [20] in model.calls
        batched = [c for c in model.calls if c != [20]]
        assert all(sum(c) <= 8 for c in batched), model.calls
        assert sorted(n for c in batched[1:] for n in c) == [3] * 5  # every queued request, once

    asyncio.run(main())


def test_a_cancelled_request_is_dropped_and_a_failed_call_reaches_every_caller():
    async def main():
        model = GatedModel(gated=True)
        b = AdaptiveBatcher(model, max_images=64)
        first = asyncio.ensure_future(b.submit(imgs(1, 0)))
        await _within(model.started.wait(), "the first model call")
        gone = asyncio.ensure_future(b.submit(imgs(5, 1)))
        kept = asyncio.ensure_future(b.submit(imgs(2, 1)))
        await asyncio.sleep(0)
        gone.cancel()
        model.release.set()
        assert await _within(kept, "the kept request") == pytest.approx(8.0)
        await first
        assert model.calls == [[1], [2]]  # the cancelled request never reached the model

        async def broken(items):
            raise RuntimeError("model failed")

        b2 = AdaptiveBatcher(broken, max_images=64)
        with pytest.raises(RuntimeError, match="model failed"):
            await _within(b2.submit(imgs(1, 0)), "the failure")

    asyncio.run(main())


def test_the_fill_wait_applies_under_load_only():
    """With a fill wait, a call that follows a multi-request call waits for more requests
    (up to max_images) instead of going at once; a lone request still never waits."""

    async def main():
        model = GatedModel(gated=True)
        b = AdaptiveBatcher(model, max_images=4, wait_s=60.0)
        first = asyncio.ensure_future(b.submit(imgs(1, 0)))
        await _within(model.started.wait(), "the first model call")
        pair = [asyncio.ensure_future(b.submit(imgs(1, 0))) for _ in range(2)]
        await asyncio.sleep(0)
        model.release.set()
        await _within(asyncio.gather(first, *pair), "the first calls")
        assert model.calls == [[1], [1, 1]]  # under load now: the next call waits to fill
        late = [asyncio.ensure_future(b.submit(imgs(1, 0))) for _ in range(4)]
        await _within(asyncio.gather(*late), "a call filled to max_images")
        assert model.calls[2:] == [[1, 1, 1, 1]]

    asyncio.run(main())


# ---------------------------------------------------------------------------- overload valve

class GatedBackend:
    """A backend over the real model whose answers wait for ``release``."""

    def __init__(self, inner):
        self.inner = inner
        self.release = asyncio.Event()
        self.waiting = 0

    async def info(self):
        return await self.inner.info()

    async def ready(self):
        return None

    async def answer(self, images):
        self.waiting += 1
        await self.release.wait()
        return await self.inner.answer(images)


def test_a_process_at_max_pending_answers_503_with_retry_after_at_once(mnist_runs):
    import httpx

    from dundi.serving import ModelConfig, ServeSettings
    from dundi.serving.app import LocalBackend, create_app

    backend = GatedBackend(LocalBackend(ModelConfig(str(mnist_runs["dundi"]))))
    app = create_app(backend, ServeSettings.create(use_env=False, max_pending=3))
    body = {"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}]}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            held = [asyncio.ensure_future(c.post("/v2/models/dundi/infer", json=body)) for _ in range(3)]
            deadline = asyncio.get_running_loop().time() + DEADLINE_S
            while backend.waiting < 3:  # all three admitted and waiting for the model
                assert asyncio.get_running_loop().time() < deadline, "requests never reached the backend"
                await asyncio.sleep(0.01)
            extra = await _within(c.post("/classify", json=[[[0.5] * 28] * 28]), "the refusal")
            assert extra.status_code == 503 and extra.headers["retry-after"] == "1", extra.text
            assert extra.json()["code"] == "overloaded"
            assert (await c.get("/v2/health/ready")).status_code == 200  # health is never refused
            backend.release.set()
            done = await _within(asyncio.gather(*held), "the held answers")
            assert [r.status_code for r in done] == [200] * 3
            after = await c.post("/v2/models/dundi/infer", json=body)  # capacity came back at once
            assert after.status_code == 200, after.text

    asyncio.run(main())
