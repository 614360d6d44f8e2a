"""The online endpoint's Ray-free parts: request validation, image decoding, response shaping,
the FastAPI app (shared by the Ray Serve ingress and the plain-uvicorn server) and abstain
calibration. The Serve deployments live in :mod:`dundi.distributed.serve_app`.

Nothing here imports ray (tests/test_core_imports.py).
"""

from dundi.serving.errors import RequestError
from dundi.serving.settings import ServeSettings

__all__ = ["LoadedModel", "ModelConfig", "ModelInfo", "Prediction", "RequestError", "ServeSettings",
           "create_app"]


def __getattr__(name: str):
    # torch (the model) and FastAPI (the app) are imported only by those who use them: the
    # CLI's parser reads the settings' defaults without either
    if name == "create_app":
        from dundi.serving.app import create_app

        return create_app
    if name in ("LoadedModel", "ModelConfig", "ModelInfo", "Prediction"):
        from dundi.serving import model

        return getattr(model, name)
    raise AttributeError(name)
