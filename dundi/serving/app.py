"""The HTTP API as a FastAPI app, the same for the Ray Serve ingress and the plain reference.

:func:`create_app` takes a *backend* — where images go to be classified — and the limits.
Ray Serve's ingress passes a backend that calls the classifier deployment
(:mod:`dundi.distributed.serve_app`); :class:`LocalBackend` classifies in this process, which
is the plain single-process uvicorn app (``dundi serve RUN --no-ray``, and the no-Ray
reference of ``bench/serve.py``).

Routes (Open Inference Protocol v2, as served by KServe and Triton, plus two of DunDi's)::

    GET  /v2/health/live                 200 while the server runs
    GET  /v2/health/ready                200 when the model answers, else 503
    GET  /v2                             server metadata
    GET  /v2/models/{name}               model metadata (inputs, outputs, n, m, k, ...)
    GET  /v2/models/{name}/ready         200 / 503
    POST /v2/models/{name}/infer         v2 JSON inference (also .../versions/{v}/infer)
    POST /classify                       PNG/JPEG (raw body or multipart) or a JSON array
    POST /admin/reload                   swap run / n / m / k / abstain threshold (admin token)
    POST /admin/classes                  enroll or remove a class of the index (admin token)

Every refusal is a JSON body (see :mod:`dundi.serving.errors`); a request never reaches the
model before its size, content type, JSON, shape, dtype and values are checked, and a model
that does not answer within the timeout gives 504 instead of a hang.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from typing import Any, Awaitable, Callable, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dundi import __version__
from dundi.serving import admin
from dundi.serving.admin import ClassChange, parse_class_change
from dundi.serving.admission import Admission
from dundi.serving.errors import RequestError
from dundi.serving.inputs import (
    IMAGE_TYPES,
    InputSpec,
    decode_image,
    images_from_parts,
    is_json_type,
    media_type,
    parse_classify_json,
    parse_json,
    parse_multipart,
    parse_v2_infer,
)
from dundi.serving.model import LoadedModel, ModelConfig, ModelInfo, Prediction
from dundi.serving.outputs import V2_OUTPUTS, classify_response, dumps, model_metadata, v2_response
from dundi.serving.settings import SERVICE_HOST, SERVICE_PORT, ServeSettings, token_matches

log = logging.getLogger("dundi.serving")

PARSE_IN_THREAD_BYTES = 64 * 1024  # bodies larger than this are parsed off the event loop


class Unavailable(Exception):
    """The model cannot answer right now (not loaded, workers gone): 503, retry later."""


class Backend(Protocol):
    """Where the app sends validated images."""

    async def info(self) -> ModelInfo:
        """The model being served (may be a few seconds stale)."""

    async def answer(self, images: np.ndarray) -> tuple[Prediction, ModelInfo]:
        """Classify (N, C, H, W) float32 images; the info of the model that answered."""

    async def ready(self) -> str | None:
        """None when ready to answer, else why not."""

    async def reload(self, changes: dict) -> dict:
        """Apply new model settings (a partial :class:`ModelConfig`), keeping the old model
        when the new one fails to load (RequestError 422)."""

    async def change_classes(self, change: ClassChange) -> dict:
        """Enroll or remove a class of the served run's index, then serve the new version
        (:mod:`dundi.serving.admin`)."""


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(exc: RequestError) -> Response:
    return json_response(exc.body(), exc.status, exc.headers)


def guarded(fn: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Every route answers JSON: refusals as 4xx, model trouble as 503/504, bugs as 500."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs) -> Response:
        try:
            return await fn(*args, **kwargs)
        except RequestError as exc:
            return error_response(exc)
        except Unavailable as exc:
            return json_response({"error": f"the model is unavailable: {exc}", "code": "unavailable"},
                                 503, {"Retry-After": "1"})
        except ClientDisconnect:  # nobody is listening any more; answer for the record only
            return json_response({"error": "the client disconnected", "code": "client_disconnected"}, 400)
        except asyncio.TimeoutError:
            return json_response({"error": "the model did not answer in time", "code": "timeout"}, 504)
        except Exception:  # a bug: log it, answer JSON, keep serving
            log.exception("internal error")
            return json_response({"error": "internal error (logged on the server)", "code": "internal"}, 500)

    return wrapper


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes before reading them all."""
    too_large = RequestError(413, "body_too_large", "the request body is larger than the limit",
                             f"at most {limit} bytes (split the batch)")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large
        except ValueError:
            raise RequestError(400, "invalid_request", f"Content-Length {declared!r} is not a number") from None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _off_loop(body: bytes, fn: Callable[[], Any]) -> Any:
    """Parse small bodies inline, large ones in a thread so the event loop keeps serving."""
    return await asyncio.to_thread(fn) if len(body) > PARSE_IN_THREAD_BYTES else fn()


def create_app(backend: Backend, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The DunDi HTTP API over ``backend`` with ``settings``' limits and tokens."""
    app = FastAPI(title="DunDi", version=__version__, docs_url=None, redoc_url=None,
                  description="Two-step oracle classification (Cui et al., ICCS 2019).")
    app.state.backend = backend
    app.state.settings = settings
    ctx = _Context(backend, settings)
    _add_error_handlers(app, ctx)
    _add_health_routes(app, ctx)
    _add_inference_routes(app, ctx)
    _add_admin_routes(app, ctx)
    app.add_middleware(Admission, max_pending=settings.max_pending, max_body_bytes=settings.max_body_bytes)
    return app


@dataclasses.dataclass
class _Context:
    """What every route checks and calls: the backend, the settings and their guards."""

    backend: Backend
    settings: ServeSettings

    def authorize(self, request: Request) -> None:
        if self.settings.auth_token_sha256 and not token_matches(request.headers.get("authorization"),
                                                                 self.settings.auth_token_sha256):
            raise RequestError(401, "unauthorized", "a valid bearer token is required",
                               "an 'Authorization: Bearer <token>' header",
                               {"WWW-Authenticate": 'Bearer realm="dundi"'})

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise RequestError(404, "unknown_model", f"unknown model {name!r}",
                               f'model name "{self.settings.model_name}"')

    async def spec(self) -> tuple[InputSpec, ModelInfo]:
        info = await self.backend.info()
        return InputSpec(info.in_shape, self.settings.max_batch), info

    async def answer(self, images: np.ndarray) -> tuple[Prediction, ModelInfo]:
        return await asyncio.wait_for(self.backend.answer(images), self.settings.request_timeout_s)

    def authorize_admin(self, request: Request) -> None:
        """Admin routes: enabled by an admin token, and only for requests bearing it, as JSON."""
        if not self.settings.admin_token_sha256:
            raise RequestError(403, "admin_disabled", "the admin routes are disabled",
                               "a service started with --admin-token (or $DUNDI_ADMIN_TOKEN)")
        header = request.headers.get("authorization")
        if not token_matches(header, self.settings.admin_token_sha256):
            raise RequestError(401 if not header else 403, "unauthorized" if not header else "forbidden",
                               "a valid admin bearer token is required" if not header else "wrong admin token",
                               "an 'Authorization: Bearer <admin token>' header",
                               {"WWW-Authenticate": 'Bearer realm="dundi-admin"'} if not header else None)
        mtype = media_type(request.headers.get("content-type"))
        if mtype and not is_json_type(mtype):
            raise RequestError(415, "unsupported_media_type", f"Content-Type {mtype!r} is not accepted",
                               "application/json")


def _add_error_handlers(app: FastAPI, ctx: _Context) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        expected = {404: "one of the routes GET /v2/health/live, /v2/health/ready, /v2/models/"
                         f"{ctx.settings.model_name}; POST /v2/models/{ctx.settings.model_name}/infer, /classify",
                    405: "the method listed in the Allow header"}
        body = RequestError(exc.status_code, codes.get(exc.status_code, "http_error"),
                            f"{request.method} {request.url.path}: {exc.detail}",
                            expected.get(exc.status_code)).body()
        return json_response(body, exc.status_code, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return json_response({"error": f"invalid request: {exc.errors()}", "code": "invalid_request"}, 422)


def _add_health_routes(app: FastAPI, ctx: _Context) -> None:
    @app.get("/v2/health/live")
    @guarded
    async def live() -> Response:
        return json_response({"live": True})

    @app.get("/v2/health/ready")
    @guarded
    async def ready() -> Response:
        reason = await ctx.backend.ready()
        return json_response({"ready": reason is None, **({"reason": reason} if reason else {})},
                             200 if reason is None else 503)

    @app.get("/v2")
    @guarded
    async def server_metadata(request: Request) -> Response:
        ctx.authorize(request)
        return json_response({"name": "dundi", "version": __version__, "extensions": []})

    @app.get("/v2/models/{name}")
    @guarded
    async def metadata(name: str, request: Request) -> Response:
        ctx.authorize(request)
        ctx.check_model(name)
        return json_response(model_metadata(await ctx.backend.info(), ctx.settings.model_name))

    @app.get("/v2/models/{name}/ready")
    @guarded
    async def model_ready(name: str) -> Response:
        ctx.check_model(name)
        reason = await ctx.backend.ready()
        return json_response({"name": name, "ready": reason is None}, 200 if reason is None else 503)


def _add_inference_routes(app: FastAPI, ctx: _Context) -> None:
    async def infer(request: Request, name: str, version: str | None) -> Response:
        ctx.authorize(request)
        ctx.check_model(name)
        mtype = media_type(request.headers.get("content-type"))
        if mtype and not is_json_type(mtype):
            raise RequestError(415, "unsupported_media_type", f"Content-Type {mtype!r} is not accepted",
                               "application/json (Open Inference Protocol v2 JSON)")
        body = await read_body(request, ctx.settings.max_body_bytes)
        input_spec, info = await ctx.spec()
        if version is not None and version != info.version:
            raise RequestError(404, "unknown_version", f"model {name!r} has no version {version!r}",
                               f"version {info.version!r} (or omit the version)")
        req = await _off_loop(body, lambda: parse_v2_infer(parse_json(body), input_spec, V2_OUTPUTS))
        pred, info = await ctx.answer(req.images)
        return json_response(v2_response(pred, info, ctx.settings.model_name, req.id, req.outputs))

    @app.post("/v2/models/{name}/infer")
    @guarded
    async def infer_latest(name: str, request: Request) -> Response:
        return await infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    @guarded
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await infer(request, name, version)

    @app.post("/classify")
    @guarded
    async def classify_route(request: Request) -> Response:
        return await classify(request)

    async def classify(request: Request) -> Response:
        ctx.authorize(request)
        mtype = media_type(request.headers.get("content-type"))
        accepted = "application/json, image/png, image/jpeg or multipart/form-data (one file per image)"
        if not (is_json_type(mtype) or mtype in (*IMAGE_TYPES, "image/jpg") or mtype == "multipart/form-data"):
            raise RequestError(415, "unsupported_media_type",
                               f"Content-Type {mtype or '(none)'!r} is not accepted", accepted)
        body = await read_body(request, ctx.settings.max_body_bytes)
        input_spec, _ = await ctx.spec()
        if is_json_type(mtype):
            images = await _off_loop(body, lambda: parse_classify_json(parse_json(body), input_spec))
        elif mtype == "multipart/form-data":
            content_type = request.headers["content-type"]
            images = await _off_loop(body, lambda: images_from_parts(parse_multipart(body, content_type),
                                                                     input_spec))
        else:
            images = await _off_loop(body, lambda: decode_image(body, input_spec.in_shape)[None])
        pred, info = await ctx.answer(images)
        return json_response(classify_response(pred, info, ctx.settings.model_name))


def _add_admin_routes(app: FastAPI, ctx: _Context) -> None:
    @app.post("/admin/classes")
    @guarded
    async def classes_route(request: Request) -> Response:
        ctx.authorize_admin(request)
        body = await read_body(request, ctx.settings.max_body_bytes)
        input_spec, _ = await ctx.spec()
        change = await _off_loop(body, lambda: parse_class_change(parse_json(body), input_spec))
        return json_response(await ctx.backend.change_classes(change))

    @app.post("/admin/reload")
    @guarded
    async def reload(request: Request) -> Response:
        ctx.authorize_admin(request)
        changes = parse_json(await read_body(request, 64 * 1024))
        if not isinstance(changes, dict) or not changes:
            raise RequestError(422, "invalid_config", "nothing to change",
                               'a JSON object with any of "run", "n", "m", "k", "abstain_threshold", '
                               '"abstain_min_norm", "abstain_max_grey", "abstain_max_mean"')
        return json_response(await ctx.backend.reload(changes))


class LocalBackend:
    """Classifies in this process: the plain single-process server (no Ray).

    Inference runs in worker threads (``concurrency`` at a time) so the event loop keeps
    parsing requests; a reload loads the new model in a thread and swaps it in atomically,
    so requests in flight finish on the model they started with.
    """

    def __init__(self, config: ModelConfig, concurrency: int = 1, model: LoadedModel | None = None):
        import anyio

        self._model = model if model is not None and model.config == config else LoadedModel(config)
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._reload_lock = asyncio.Lock()
        self._classes_lock = asyncio.Lock()

    @property
    def model(self) -> LoadedModel:
        return self._model

    async def info(self) -> ModelInfo:
        return self._model.info

    async def answer(self, images: np.ndarray) -> tuple[Prediction, ModelInfo]:
        import anyio

        model = self._model
        pred = await anyio.to_thread.run_sync(model.predict, images, limiter=self._limiter)
        return pred, model.info

    async def ready(self) -> str | None:
        return None

    async def change_classes(self, change: ClassChange) -> dict:
        async with self._classes_lock:  # one change (write + swap) at a time: versions in order
            return await admin.change_classes(self._model.config, change, self.reload)

    async def reload(self, changes: dict) -> dict:
        async with self._reload_lock:
            old = self._model
            config = ModelConfig.from_dict(changes, base=old.config)
            try:
                new = await asyncio.to_thread(LoadedModel, config)
            except Exception as exc:  # any failed load (bad hash, missing file, bad n/m/k) keeps the old model
                raise RequestError(422, "reload_failed", f"{exc}; still serving version {old.info.version}",
                                   "a DunDi run directory with a verified oracle index, and n, m, k it can honour") from None
            self._model = new
            return {"reloaded": True, "previous_version": old.info.version, "model": new.info.to_dict()}


def serve_plain(config: ModelConfig, settings: ServeSettings, host: str = SERVICE_HOST, port: int = SERVICE_PORT,
                concurrency: int = 1, torch_threads: int | None = 1, log_level: str = "warning",
                model: LoadedModel | None = None) -> None:
    """Run the plain single-process uvicorn server until interrupted. The model is loaded
    before the port opens (``model``, if given, is used as is), so this server is ready the
    moment it accepts a connection."""
    import torch
    import uvicorn

    if torch_threads:
        torch.set_num_threads(torch_threads)

    uvicorn.run(create_app(LocalBackend(config, concurrency, model), settings), host=host, port=port,
                log_level=log_level, access_log=False)
