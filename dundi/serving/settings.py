"""Service limits and credentials, shared by the Ray Serve ingress and the plain-uvicorn app.

Tokens are never stored: only their sha256 travels in settings (and so in Serve's deployment
arguments), and a presented token is hashed and compared in constant time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os

from dundi.errors import DundiError

AUTH_TOKEN_ENV = "DUNDI_SERVE_TOKEN"    # bearer token for inference and metadata routes
ADMIN_TOKEN_ENV = "DUNDI_ADMIN_TOKEN"   # bearer token for POST /admin/reload
SERVICE_HOST, SERVICE_PORT = "127.0.0.1", 8000  # where `dundi serve` listens unless told otherwise
# how `dundi classify RUN IMAGES` writes its answers (dundi.serving.answers)
ANSWER_FORMATS: tuple[str, ...] = ("table", "jsonl", "csv", "parquet")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(authorization: str | None, token_sha256: str) -> bool:
    """Whether an ``Authorization: Bearer <token>`` header carries the token with this hash."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    return hmac.compare_digest(hash_token(token.strip()), token_sha256)


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What the HTTP layer enforces. Defaults suit 28×28 and 32×32 images on one host.

    ``max_pending`` is the overload valve: a process already answering that many inference
    requests (reading, queued or in the model) answers the next one 503 with ``Retry-After``
    at once, so under too much traffic every request still gets a prompt answer, memory is
    bounded by ``max_pending`` bodies, and the wait of an accepted request by ``max_pending``
    model calls (bench/serve_overload.py measures both)."""

    model_name: str = "dundi"              # the {name} in /v2/models/{name}/...
    max_batch: int = 256                   # images per request
    max_body_bytes: int = 16 * 1024 * 1024  # request body, before parsing
    request_timeout_s: float = 30.0        # a request waiting longer for the model gets 504
    # inference requests in progress per process; more get 503. 32 (two model batches) over 64:
    # under 4x overload 0.86-0.90x of the sustainable rate answered at 32 against 0.78-0.90x at
    # 64 on the plain server, 0.57-0.72x against 0.53-0.65x with HAProxy; 32 won every one of
    # the alternated pairs (docs/serving.md, "Overload")
    max_pending: int = 32
    auth_token_sha256: str | None = None   # None: inference routes are open
    admin_token_sha256: str | None = None  # None: /admin/reload is disabled

    def __post_init__(self):
        if not self.model_name or "/" in self.model_name:
            raise DundiError(f"model name {self.model_name!r} must be a non-empty path segment")
        if self.max_batch < 1:
            raise DundiError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.max_body_bytes < 1024:
            raise DundiError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.max_pending < 1:
            raise DundiError(f"max_pending must be at least 1, got {self.max_pending}")
        if not self.request_timeout_s > 0:
            raise DundiError(f"request_timeout_s must be positive, got {self.request_timeout_s}")

    @classmethod
    def create(cls, *, auth_token: str | None = None, admin_token: str | None = None,
               use_env: bool = True, **fields) -> "ServeSettings":
        """Settings with tokens given in clear (from a flag, else the environment) hashed."""
        if use_env:
            auth_token = auth_token or os.environ.get(AUTH_TOKEN_ENV) or None
            admin_token = admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None
        if auth_token is not None:
            fields.setdefault("auth_token_sha256", hash_token(auth_token))
        if admin_token is not None:
            fields.setdefault("admin_token_sha256", hash_token(admin_token))
        return cls(**fields)

    def with_env_tokens(self) -> "ServeSettings":
        """Fill unset token hashes from the environment of the process serving requests (how
        a `serve deploy` config passes tokens: ``runtime_env.env_vars``)."""
        auth, admin = os.environ.get(AUTH_TOKEN_ENV), os.environ.get(ADMIN_TOKEN_ENV)
        return dataclasses.replace(
            self,
            auth_token_sha256=self.auth_token_sha256 or (hash_token(auth) if auth else None),
            admin_token_sha256=self.admin_token_sha256 or (hash_token(admin) if admin else None))


@dataclasses.dataclass(frozen=True)
class DeploymentSettings:
    """How the classifier is deployed on Ray Serve: replicas, their resources and batching.
    Declared here (not in the Ray edge) so the CLI's flags take their defaults from it
    without importing Ray; :class:`dundi.distributed.serve_app.ServeAppArgs` is composed of
    this, :class:`ServeSettings` and the model's settings."""

    replicas: int = 1                      # replicas (ignored with autoscaling)
    autoscale_min: int | None = None       # autoscaling bounds: both or neither
    autoscale_max: int | None = None
    target_ongoing_requests: float = 16.0  # autoscaling target per replica
    replica_cpus: float = 0.25             # CPUs reserved per replica (below 1 on small machines)
    torch_threads: int = 1                 # torch threads per replica
    max_batch_size: int = 16               # images per model call (docs/serving.md: the sweep)
    batch_wait_timeout_s: float = 0.0      # extra wait for a batch to fill, under load only
    max_ongoing_requests: int = 256        # per replica

    def __post_init__(self):
        for name in ("replicas", "torch_threads", "max_batch_size", "max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise DundiError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("target_ongoing_requests", "replica_cpus"):
            if not getattr(self, name) > 0:
                raise DundiError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_wait_timeout_s < 0:
            raise DundiError(f"batch_wait_timeout_s must be 0 or more, got {self.batch_wait_timeout_s}")
        if (self.autoscale_min is None) != (self.autoscale_max is None):
            raise DundiError("give both autoscale_min and autoscale_max, or neither")
        if self.autoscale_max is not None and not 0 <= self.autoscale_min <= self.autoscale_max:
            raise DundiError(f"autoscaling needs 0 <= min <= max, got {self.autoscale_min}:{self.autoscale_max}")

