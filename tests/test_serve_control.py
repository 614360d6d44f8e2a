"""Ray's private APIs behind one door (dundi/distributed/ray_private.py): the rollout logic
built on :class:`ServeControl` (declared apps, apply, status) against a fake controller, the
real controller once against a real local Ray, and a scan proving no other module of DunDi
touches Ray's private parts."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest

from dundi.errors import DundiError
from dundi.serving.errors import RequestError

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "dundi" / "distributed" / "ray_private.py"


class FakeControl:
    """A Serve controller in memory: apps declared by ``apply`` report the statuses scripted
    in ``script`` (one per status query, the last one repeating), deployments HEALTHY with
    the declared user_config and two RUNNING replicas."""

    def __init__(self, script=("RUNNING",), undeclared=()):
        self.declared: dict[str, dict] = {}
        self.undeclared = {name: {"status": "RUNNING"} for name in undeclared}
        self.applied: list[list[dict]] = []
        self.script = list(script)
        self.deployment_status = "HEALTHY"
        self.on_status = None  # called on every status query (to change things under the caller)

    def declared_apps(self) -> list[dict]:
        return [copy.deepcopy(a) for a in self.declared.values()]

    def apply(self, apps: list[dict]) -> None:
        self.applied.append(copy.deepcopy(apps))
        self.declared = {a["name"]: copy.deepcopy(a) for a in apps}

    def app_status(self, app_name: str) -> dict:
        if self.on_status:
            self.on_status(self)
        if app_name in self.undeclared:
            return self.undeclared[app_name]
        app = self.declared.get(app_name)
        if app is None:
            return {}
        status = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        deployments = {d["name"]: {"status": self.deployment_status, "message": "replica crashed",
                                   "deployment_config": {"user_config": d.get("user_config")},
                                   "replicas": [{"state": "RUNNING"}, {"state": "RUNNING"}]}
                       for d in app.get("deployments", [])}
        return {"status": status, "message": "line one\nImportError: no module", "deployed_app_config": app,
                "deployments": deployments}


def app(name: str, **user_config) -> dict:
    return {"name": name, "route_prefix": f"/{name}", "import_path": "x:y",
            "deployments": [{"name": "DunDi", "user_config": {"run": "r1", "k": 5, "max_batch_size": 64,
                                                              **user_config}}]}


def test_apply_app_keeps_the_other_declared_apps_and_waits_until_running():
    from dundi.distributed.serve_app import apply_app

    fake = FakeControl(script=("DEPLOYING", "DEPLOYING", "RUNNING"))
    fake.apply([app("other"), app("dundi", k=3)])
    apply_app(app("dundi", k=7), timeout_s=10, control=fake)
    names = [a["name"] for a in fake.applied[-1]]
    assert sorted(names) == ["dundi", "other"]  # the other app survives, dundi replaced, once
    assert fake.declared["dundi"]["deployments"][0]["user_config"]["k"] == 7
    assert fake.script == ["RUNNING"]  # it polled through both DEPLOYING answers


def test_apply_app_reports_a_failed_deploy_and_a_timeout_in_one_line():
    from dundi.distributed.serve_app import apply_app

    with pytest.raises(DundiError, match="failed to deploy: ImportError: no module"):
        apply_app(app("dundi"), timeout_s=10, control=FakeControl(script=("DEPLOY_FAILED",)))
    with pytest.raises(DundiError, match=r"not running after 0 s \(DEPLOYING\)"):
        apply_app(app("dundi"), timeout_s=0.3, control=FakeControl(script=("DEPLOYING",)))


def test_apply_user_config_changes_only_the_model_settings():
    from dundi.distributed.serve_app import apply_user_config

    fake = FakeControl()
    fake.apply([app("other"), app("dundi")])
    out = apply_user_config("dundi", "DunDi", {"run": "r2", "k": 3}, timeout_s=10, control=fake)
    assert out == {"replicas": 2}
    user = fake.declared["dundi"]["deployments"][0]["user_config"]
    assert user == {"run": "r2", "k": 3, "max_batch_size": 64}  # batching knobs kept
    assert fake.declared["other"]["deployments"][0]["user_config"]["run"] == "r1"


def test_apply_user_config_refusals():
    from dundi.distributed.serve_app import apply_user_config

    with pytest.raises(RequestError) as info:
        apply_user_config("dundi", "DunDi", {"k": 3}, control=FakeControl(undeclared=["dundi"]))
    assert (info.value.status, info.value.code) == (409, "not_declarative")

    fake = FakeControl()
    fake.apply([app("dundi")])

    def someone_else(f):  # another reload lands while this one waits
        f.declared["dundi"]["deployments"][0]["user_config"]["k"] = 9
    fake.on_status = someone_else
    with pytest.raises(RequestError) as info:
        apply_user_config("dundi", "DunDi", {"run": "r1", "k": 3}, timeout_s=10, control=fake)
    assert (info.value.status, info.value.code) == (409, "reload_superseded")

    fake = FakeControl()
    fake.apply([app("dundi")])
    fake.deployment_status = "UNHEALTHY"
    with pytest.raises(RequestError) as info:
        apply_user_config("dundi", "DunDi", {"run": "r1", "k": 3}, timeout_s=10, control=fake)
    assert (info.value.status, info.value.code) == (422, "reload_failed") and "replica crashed" in info.value.message


def _private_uses(path: Path) -> list[str]:
    """Imports of Ray's private modules and uses of its private controller handles in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found += [f"import {m}" for m in modules if m.startswith("ray") and "._" in m]
        if isinstance(node, ast.Attribute) and node.attr in ("_controller", "_get_global_client", "_private"):
            found.append(f".{node.attr}")
    return found


def test_only_the_adapter_touches_rays_private_parts():
    uses = {str(p.relative_to(ROOT)): _private_uses(p) for p in (ROOT / "dundi").rglob("*.py")}
    others = {p: u for p, u in uses.items() if u and Path(ROOT / p) != ADAPTER}
    assert not others, f"Ray's private APIs used outside dundi/distributed/ray_private.py: {others}"
    assert uses[str(ADAPTER.relative_to(ROOT))], "the scan finds nothing even in the adapter: it is broken"


@pytest.mark.ray
def test_the_real_controller_answers_through_the_adapter(ray_local):
    """Once against a real local Ray and Serve: every private API the adapter uses exists."""
    import os
    import socket

    from ray import serve

    from dundi.distributed.ray_private import RayServeControl, haproxy_binary_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        control = RayServeControl()
        assert control.declared_apps() == []
        control.apply([])  # a valid (empty) declarative config goes through the controller
        assert control.app_status("no-such-app") == {}
        assert os.access(haproxy_binary_path(), os.X_OK)
    finally:
        serve.shutdown()
