"""Ray's private APIs, behind one door: the only module of DunDi that touches them.

DunDi needs three things Ray offers only privately:

* **declarative apply** of Serve applications from Python (what ``serve deploy`` does through
  the dashboard's REST API, which a local Ray started without a dashboard lacks): the Serve
  controller's ``apply_config``, reached through the Serve client;
* **the HAProxy binary** Serve will run (``ray.serve._private.haproxy``);
* **token authentication** for a client joining a local cluster by address
  (``ray._private.authentication``).

A Ray upgrade that moves any of them breaks this file alone, and tests/test_serve_control.py
(a fake of :class:`ServeControl` for the logic built on it, plus one apply against real
Ray) says so at once. Everything else speaks to :class:`ServeControl`: declared apps, apply,
status.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol


class ServeControl(Protocol):
    """What DunDi asks of the Serve controller."""

    def declared_apps(self) -> List[dict]:
        """The config of every app deployed from a config (``serve build`` form)."""

    def apply(self, apps: List[dict]) -> None:
        """Declare exactly these apps (the controller deletes declared apps left out)."""

    def app_status(self, app_name: str) -> Dict[str, Any]:
        """An app's details: ``status``, ``message``, ``deployed_app_config`` and
        ``deployments`` (name → ``status``, ``message``, ``deployment_config``, ``replicas``);
        an empty dict when there is no such app."""


class RayServeControl:
    """:class:`ServeControl` over the running Serve instance of this Ray cluster."""

    def __init__(self, client: Any = None):
        if client is None:
            from ray.serve.context import _get_global_client

            client = _get_global_client()
        self._client = client

    def _details(self) -> dict:
        return self._client.get_serve_details()

    def declared_apps(self) -> List[dict]:
        return [app["deployed_app_config"] for app in self._details().get("applications", {}).values()
                if app.get("deployed_app_config")]

    def apply(self, apps: List[dict]) -> None:
        import ray
        from ray.serve.schema import ServeDeploySchema

        ray.get(self._client._controller.apply_config.remote(ServeDeploySchema.model_validate({"applications": apps})))

    def app_status(self, app_name: str) -> Dict[str, Any]:
        return self._details().get("applications", {}).get(app_name) or {}


def serve_control(control: Optional[ServeControl] = None) -> ServeControl:
    """``control`` itself, or the real controller of this process's Serve."""
    return control if control is not None else RayServeControl()


def haproxy_binary_path() -> str:
    """The HAProxy executable Serve would run; ImportError or FileNotFoundError if none."""
    from ray.serve._private.haproxy import get_haproxy_binary

    return get_haproxy_binary()


def cluster_wants_token(address: str, timeout_s: float = 5.0) -> Optional[bool]:
    """Whether the Ray cluster whose GCS is at ``address`` (host:port) refuses a client that
    sends no token: one GCS call without a token (``ray._raylet.GcsClient``). None when the
    question cannot be asked (this Ray has no such client, or the GCS did not answer)."""
    try:
        from ray._raylet import GcsClient
    except ImportError:
        return None
    try:
        GcsClient(address=address).internal_kv_keys(b"", None, timeout=timeout_s)
    except Exception as exc:  # Ray raises its own AuthenticationError class, private too
        return True if type(exc).__name__ == "AuthenticationError" else None
    return False


def enable_token_auth() -> bool:
    """Turn on Ray's token authentication in this client (refreshing Ray's cached config,
    read at import); False when this Ray has no such switch."""
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:
        return False
    _enable_token_auth()
    return True
