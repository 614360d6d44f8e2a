"""The online endpoint's Ray-free parts: request validation, image decoding, response shaping,
the FastAPI app (shared by the Ray Serve ingress and the plain-uvicorn server) and abstain
calibration. The Serve deployments live in :mod:`dundi.distributed.serve_app`.

Nothing here imports ray (tests/test_core_imports.py).
"""

from dundi.serving.errors import RequestError
from dundi.serving.model import LoadedModel, ModelConfig, ModelInfo, Prediction
from dundi.serving.settings import ServeSettings

__all__ = ["LoadedModel", "ModelConfig", "ModelInfo", "Prediction", "RequestError", "ServeSettings",
           "create_app"]


def __getattr__(name: str):
    if name == "create_app":  # FastAPI is imported only by those who build the app
        from dundi.serving.app import create_app

        return create_app
    raise AttributeError(name)
