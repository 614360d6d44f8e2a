"""DunDi on Ray Serve: one deployment that parses, validates, batches and classifies.

::

    HTTP ─▶ Serve proxy / HAProxy / the replica itself (direct ingress)
              ─▶ DunDi × N  (FastAPI app of dundi.serving.app: parse, validate, 4xx;
                             adaptive batching: requests queued together share one model call —
                             embed with the Distance NN, then Algorithm 1 on the FAISS index)

One hop: each replica answers HTTP and runs the model in the same process. An earlier layout
(ingress deployment → classifier deployment over a DeploymentHandle) paid a Ray call, an
object-store copy of every image batch and a second event loop per request; bench/serve.py
measured the single deployment faster at every load on one machine (README, Serving).

**Configuration is Serve's user_config** (run, n, m, k, abstain_threshold and the batching
knobs). The app is always deployed declaratively — by ``dundi serve`` (:func:`deploy`) as by
``serve deploy cluster/serve_config.yaml`` — so its code version is a hash of the import path
and ``args``; a new user_config alone keeps that version, and Serve calls ``reconfigure`` on
every running replica in place: no restart. Each replica loads and verifies the new run in a
thread while the old model keeps answering, then swaps it in atomically, so requests in
flight finish on the model they started with.

**``POST /admin/reload``** (bearer admin token) is the same swap started over HTTP: the
replica that receives it loads and verifies the new settings first (a bad run, hash or n, m,
k answers 422 and nothing changes), then re-applies the app's config with the new
user_config through the Serve controller and answers once Serve reports every replica
reconfigured. The result is the declared configuration from then on (``serve status`` and
``serve build`` show it), not a side channel that a later deploy silently overrides.

**``POST /admin/classes``** (same token) enrolls or removes a class: the receiving replica
writes the run's next index version (dundi.run.enrollment, under the run's file lock) and rolls
it out exactly as a reload does, with ``index_version`` pinned in the user_config.

``app_builder(ServeAppArgs)`` is the typed application builder used both by ``dundi serve`` and
by ``serve deploy cluster/serve_config.yaml``.
"""

import asyncio
import dataclasses
import logging
import os
import time
import typing
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import ray
from pydantic import BaseModel, create_model, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from dundi.distributed.ray_private import ServeControl, serve_control
from dundi.errors import DundiError
from dundi.serving import admin
from dundi.serving.admin import ClassChange
from dundi.serving.app import Unavailable, create_app
from dundi.serving.batching import AdaptiveBatcher
from dundi.serving.errors import RequestError
from dundi.serving.model import LoadedModel, ModelConfig, ModelInfo, Prediction, check_shape
from dundi.serving.settings import SERVICE_HOST, SERVICE_PORT, DeploymentSettings, ServeSettings

log = logging.getLogger("ray.serve")

APP_NAME = "dundi"
DEPLOYMENT_NAME = "DunDi"
IMPORT_PATH = "dundi.distributed.serve_app:app_builder"
BATCH_KEYS = ("max_batch_size", "batch_wait_timeout_s")
RELOAD_EXPECTED = ("a DunDi run directory (readable on every node) with a verified oracle index, "
                   "and n, m, k it can honour")


# ------------------------------------------------------------------------------ rollout

def _model_part(user_config: Optional[dict]) -> dict:
    return {k: v for k, v in (user_config or {}).items() if k in ModelConfig.FIELDS}


def apply_user_config(app_name: str, deployment: str, model: Dict[str, Any], timeout_s: float = 120.0,
                      control: Optional[ServeControl] = None) -> Dict[str, Any]:
    """Re-apply ``app_name``'s config with ``model`` as the deployment's model settings and
    wait until Serve reports every replica reconfigured. Blocking: call it in a thread.

    Only the deployment's ``user_config`` changes, so the app's code version stays and Serve
    reconfigures the running replicas in place. Returns how many replicas run the new
    settings; raises RequestError when the app was not deployed from a config, another
    change replaced this one, or the rollout does not finish in time.
    """
    control = serve_control(control)
    apps = control.declared_apps()
    mine = next((a for a in apps if a["name"] == app_name), None)
    if mine is None:
        raise RequestError(409, "not_declarative",
                           f"app {app_name!r} was not deployed from a config, so it cannot be reconfigured",
                           "an app deployed by `dundi serve` or `serve deploy`")
    deployments = [dict(d) for d in mine.get("deployments", [])]
    entry = next((d for d in deployments if d["name"] == deployment), None)
    if entry is None:
        entry = {"name": deployment}
        deployments.append(entry)
    entry["user_config"] = {**(entry.get("user_config") or {}), **model}
    mine["deployments"] = deployments
    control.apply(apps)
    return wait_for_user_config(app_name, deployment, model, timeout_s, control)


def wait_for_user_config(app_name: str, deployment: str, model: Dict[str, Any], timeout_s: float,
                         control: Optional[ServeControl] = None) -> Dict[str, Any]:
    """Wait until ``deployment`` targets ``model`` and is HEALTHY (Serve marks a deployment
    UPDATING from the moment its target changes until every replica's ``reconfigure``
    returned). Returns ``{"replicas": N}``."""
    control = serve_control(control)
    deadline = time.monotonic() + timeout_s
    status = "unknown"
    while True:
        app = control.app_status(app_name)
        declared = next((d.get("user_config") for d in (app.get("deployed_app_config") or {}).get("deployments", [])
                         if d.get("name") == deployment), None)
        if _model_part(declared) != _model_part(model):  # the declared config is updated at once
            raise RequestError(409, "reload_superseded", "another change of the model settings replaced this one",
                               "one reload at a time")
        dep = (app.get("deployments") or {}).get(deployment) or {}
        target = _model_part((dep.get("deployment_config") or {}).get("user_config"))
        status = str(dep.get("status", "missing")).rsplit(".", 1)[-1].upper()
        if target == _model_part(model) and status == "HEALTHY":
            running = sum(1 for r in dep.get("replicas", []) if str(r.get("state")).upper().endswith("RUNNING"))
            return {"replicas": running}
        if status in ("UNHEALTHY", "DEPLOY_FAILED"):
            raise RequestError(422, "reload_failed", f"Serve reports the deployment {status}: "
                               f"{dep.get('message', '')}", RELOAD_EXPECTED)
        if time.monotonic() > deadline:
            raise RequestError(504, "reload_timeout", f"the replicas did not all reconfigure within {timeout_s:.0f} s "
                               f"(deployment {status})", "retry, or check `serve status`")
        time.sleep(0.1)


# ------------------------------------------------------------------------------ the deployment

class ReplicaBackend:
    """The app's backend inside a replica: the model itself, batched by an
    :class:`~dundi.serving.batching.AdaptiveBatcher`.

    Requests queued together (up to ``max_batch_size`` images) share one model call, and a
    request that finds the model idle goes to it at once; ``batch_wait_timeout_s`` is an extra
    wait for company used only under load. A request larger than a batch runs on its own. The
    model is swapped by :meth:`configure` (Serve's ``reconfigure``)."""

    def __init__(self, app_name: str, deployment: str, rollout_timeout_s: float = 120.0):
        self._app = app_name
        self._deployment = deployment
        self._rollout_timeout_s = rollout_timeout_s
        self.model: Optional[LoadedModel] = None
        self.declared: Optional[ModelConfig] = None
        self.last_error: Optional[str] = None
        self._staged: Optional[LoadedModel] = None   # loaded by /admin/reload, adopted by configure
        defaults = DeploymentSettings()
        self._batcher = AdaptiveBatcher(self._infer, defaults.max_batch_size, defaults.batch_wait_timeout_s)
        self._swap_lock = asyncio.Lock()     # one model load at a time in this replica
        self._reload_lock = asyncio.Lock()   # one admin reload at a time through this replica
        self._classes_lock = asyncio.Lock()  # one class change (write + rollout) at a time here

    # ---- configuration -----------------------------------------------------------------
    async def configure(self, user_config: Dict[str, Any]) -> None:
        """Apply a user_config: the batching knobs at once, the model by a verified load in a
        thread (the old model answers meanwhile). A replica without a model fails to start;
        one that has a model keeps it when the new one cannot load, and says so in
        ``last_error`` (metadata and logs) rather than dropping out of service."""
        user_config = dict(user_config or {})
        batching = {k: user_config.pop(k) for k in BATCH_KEYS if k in user_config}
        self._batcher.configure(batching.get("max_batch_size"), batching.get("batch_wait_timeout_s"))
        try:
            declared = ModelConfig.from_dict(user_config)
        except RequestError as exc:
            if self.model is None:
                raise ValueError(f"invalid {self._deployment} user_config: {exc.message}") from None
            self.last_error = f"invalid user_config ignored, kept version {self.model.info.version}: {exc.message}"
            log.error(self.last_error)
            return
        async with self._swap_lock:
            self.declared = declared
            if self.model is not None and self.model.config == declared:
                return
            try:
                staged = self._staged
                new = staged if staged is not None and staged.config == declared else \
                    await asyncio.to_thread(LoadedModel, declared)
            except Exception as exc:
                if self.model is None:
                    raise  # nothing to fall back on: the replica must not start
                self.last_error = f"reconfigure kept version {self.model.info.version}: {exc}"
                log.error(self.last_error)
                return
            self.model, self.last_error = new, None
            log.info("serving %s (version %s)", declared, new.info.version)

    # ---- Backend protocol (dundi.serving.app) ------------------------------------------
    async def info(self) -> ModelInfo:
        if self.model is None:
            raise Unavailable("the model is loading")
        return self.model.info

    async def ready(self) -> Optional[str]:
        return None if self.model is not None else "the model is loading"

    async def answer(self, images: np.ndarray) -> Tuple[Prediction, ModelInfo]:
        out = await self._batcher.submit(images)
        if isinstance(out, (RequestError, Unavailable)):
            raise out
        return out

    async def _infer(self, items: List[np.ndarray]) -> list:
        model = self.model  # one model for the whole batch, even if a swap lands meanwhile
        if model is None:
            return [Unavailable("the model is loading")] * len(items)
        out: list = [None] * len(items)
        good = []
        for i, x in enumerate(items):
            try:
                check_shape(x, model.info.in_shape)
                good.append(i)
            except RequestError as exc:
                out[i] = exc
        if good:
            batch = np.concatenate([items[i] for i in good]) if len(good) > 1 else items[good[0]]
            pred = await asyncio.to_thread(model.predict, batch)
            for i, part in zip(good, pred.split([len(items[i]) for i in good])):
                out[i] = (part, model.info)
        return out

    async def change_classes(self, change: ClassChange) -> dict:
        """Enroll or remove a class in the run's index (under the run's file lock, so replicas
        never lose each other's changes), then roll the new index version out to every replica."""
        if self.model is None:
            raise Unavailable("the model is loading")
        async with self._classes_lock:
            return await admin.change_classes(self.model.config, change, self.reload)

    async def reload(self, changes: dict) -> dict:
        """Load and verify the new settings here (422 and no change if that fails), then roll
        them out as the deployment's user_config and answer when every replica has them."""
        async with self._reload_lock:
            old = self.model
            if old is None:
                raise Unavailable("the model is loading")
            config = ModelConfig.from_dict(changes, base=old.config)
            try:
                self._staged = await asyncio.to_thread(LoadedModel, config)
            except Exception as exc:
                raise RequestError(422, "reload_failed", f"{exc}; still serving version {old.info.version}",
                                   RELOAD_EXPECTED) from None
            try:
                rollout = await asyncio.to_thread(apply_user_config, self._app, self._deployment,
                                                  config.to_dict(), self._rollout_timeout_s)
            finally:
                self._staged = None
            new = self.model
            if new is None or new.config != config:  # this replica's reconfigure kept the old model
                raise RequestError(422, "reload_failed", f"the rollout did not take here: {self.last_error}",
                                   RELOAD_EXPECTED)
            return {"reloaded": True, "replicas": rollout["replicas"], "previous_version": old.info.version,
                    "previous_config": old.config.to_dict(), "model": new.info.to_dict()}

    def describe(self) -> dict:
        if self.model is None:
            raise RuntimeError("no model loaded")
        return {"info": self.model.info.to_dict(), "config": self.model.config.to_dict(),
                "declared": self.declared.to_dict() if self.declared else None, "last_error": self.last_error}


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=DeploymentSettings.max_ongoing_requests,
                  ray_actor_options={"num_cpus": DeploymentSettings.replica_cpus}, health_check_period_s=5)
@serve.ingress()
class DunDi:
    """One replica: the FastAPI app of :func:`dundi.serving.app.create_app` over a model held
    in this process (:class:`ReplicaBackend`)."""

    def __init__(self, settings: Dict[str, Any], torch_threads: int = 1):
        import torch

        torch.set_num_threads(max(1, torch_threads))
        ctx = serve.get_replica_context()
        self._actor_name = ctx.replica_id.to_full_id_str()  # the replica's Ray actor (namespace "serve")
        self._settings = ServeSettings(**settings).with_env_tokens()
        self._backend = ReplicaBackend(ctx.app_name, ctx.deployment,
                                       rollout_timeout_s=max(60.0, 4 * self._settings.request_timeout_s))

    async def reconfigure(self, user_config: Dict[str, Any]) -> None:
        """Serve calls this with the user_config: at start and on every change, in place."""
        await self._backend.configure(user_config)

    def check_health(self) -> None:
        if self._backend.model is None:
            raise RuntimeError("no model loaded")

    def describe(self) -> dict:
        """The served model and this replica's actor name (for operators and tests)."""
        return {**self._backend.describe(), "actor_name": self._actor_name}

    def __serve_build_asgi_app__(self):
        return create_app(self._backend, self._settings)


# ------------------------------------------------------------------------------ builder

SETTINGS_RENAMED = {"max_batch": "max_request_batch"}  # ServeSettings.max_batch, as Serve configs name it


def _fields_of(declaration: type, rename: dict[str, str] | None = None) -> dict[str, tuple]:
    """pydantic field specs taken from a settings dataclass: its names, types and defaults."""
    hints = typing.get_type_hints(declaration)
    return {(rename or {}).get(f.name, f.name): (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(declaration)}


def _pick(args: BaseModel, declaration: type, rename: dict[str, str] | None = None) -> dict:
    return {f.name: getattr(args, (rename or {}).get(f.name, f.name)) for f in dataclasses.fields(declaration)}


class _ServeAppMethods(BaseModel):
    """What a Serve app's arguments do; the fields come from the three declarations below."""

    @model_validator(mode="after")
    def _check(self):
        try:  # each declaration checks its own ranges
            self.deployment()
            self.settings()
        except DundiError as exc:
            raise ValueError(str(exc)) from None
        return self

    def model_config_dict(self) -> dict:
        return ModelConfig(**_pick(self, ModelConfig)).to_dict()

    def user_config(self) -> dict:
        return {**self.model_config_dict(), "max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s}

    def settings(self) -> ServeSettings:
        return ServeSettings(**_pick(self, ServeSettings, SETTINGS_RENAMED))

    def deployment(self) -> DeploymentSettings:
        return DeploymentSettings(**_pick(self, DeploymentSettings))

    def autoscaling_config(self) -> Optional[dict]:
        if self.autoscale_max is None:
            return None
        return {"min_replicas": self.autoscale_min, "max_replicas": self.autoscale_max,
                "initial_replicas": max(1, self.autoscale_min),
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": 5.0, "downscale_delay_s": 60.0}


# Arguments of :func:`app_builder` (the ``args:`` of a Serve config file): the model's settings
# (ModelConfig), the HTTP layer's (ServeSettings) and the deployment's (DeploymentSettings),
# each declared once in dundi/serving and composed here, flat, as Serve config files give them.
ServeAppArgs = create_model("ServeAppArgs", __base__=_ServeAppMethods,
                            **_fields_of(ModelConfig), **_fields_of(ServeSettings, SETTINGS_RENAMED),
                            **_fields_of(DeploymentSettings))


def app_builder(args: ServeAppArgs) -> Application:
    """The DunDi Serve application: one deployment, configured by ``args``."""
    if isinstance(args, dict):  # called directly rather than by Serve
        args = ServeAppArgs.model_validate(args)
    try:
        ModelConfig.from_dict(args.model_config_dict())
        args.settings()
    except (RequestError, DundiError) as exc:
        raise ValueError(str(exc)) from None
    scaling = args.autoscaling_config()
    return DunDi.options(
        user_config=args.user_config(),
        ray_actor_options={"num_cpus": args.replica_cpus},
        max_ongoing_requests=args.max_ongoing_requests,
        **({"autoscaling_config": scaling} if scaling else {"num_replicas": args.replicas}),
    ).bind({f: getattr(args.settings(), f) for f in ServeSettings.__dataclass_fields__},
           torch_threads=args.torch_threads)


def app_config(args: ServeAppArgs, app_name: str = APP_NAME, route_prefix: str = "/",
               logging_config: Optional[dict] = None) -> dict:
    """The Serve application config (one entry of a config file's ``applications:``) that
    ``dundi serve`` deploys: the same form as cluster/serve_config.yaml, so both are
    reconfigured the same way."""
    cfg = {"name": app_name, "route_prefix": route_prefix, "import_path": IMPORT_PATH,
           "args": args.model_dump(exclude_none=True),
           "deployments": [{"name": DEPLOYMENT_NAME, "user_config": args.user_config()}]}
    if logging_config is not None:
        cfg["logging_config"] = logging_config
    return cfg


def apply_app(app: dict, timeout_s: float = 300.0, control: Optional[ServeControl] = None) -> None:
    """Deploy one app config declaratively next to the other declared apps (the controller
    deletes declared apps missing from what it is given) and wait until it runs."""
    control = serve_control(control)
    control.apply([a for a in control.declared_apps() if a["name"] != app["name"]] + [app])
    deadline = time.monotonic() + timeout_s
    while True:
        details = control.app_status(app["name"])
        status = str(details.get("status", ""))
        if status.endswith("RUNNING"):
            return
        if status.endswith("DEPLOY_FAILED") or status.endswith("UNHEALTHY"):
            message = (details.get("message") or status).strip().splitlines()
            raise DundiError(f"the Serve app {app['name']!r} failed to deploy: {message[-1] if message else status}")
        if time.monotonic() > deadline:
            raise DundiError(f"the Serve app {app['name']!r} is not running after {timeout_s:.0f} s ({status})")
        time.sleep(0.2)


def deploy(args: ServeAppArgs, host: str = SERVICE_HOST, port: int = SERVICE_PORT, address: Optional[str] = None,
           app_name: str = APP_NAME, num_cpus: Optional[int] = None, access_log: bool = False
           ) -> DeploymentHandle:
    """Start (or join) Ray, start Serve's HTTP proxy on host:port and run the app from its
    config (as ``serve deploy`` would), returning once it runs. Per-request access logs are
    off unless asked for: on a small machine writing them costs a noticeable share of CPU."""
    from dundi.distributed.ray_init import init_ray

    init_ray(address, num_cpus=num_cpus)
    logging_config = {"enable_access_log": access_log}
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    apply_app(app_config(args, app_name, logging_config=logging_config))
    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name)


def shutdown(app_name: str = APP_NAME) -> None:
    """Delete the app (Serve itself keeps running for other apps)."""
    serve.delete(app_name)


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
