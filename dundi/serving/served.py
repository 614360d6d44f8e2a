"""A run loaded as `dundi serve` and `dundi classify RUN IMAGES` serve it: the rule's config,
the verified model and the abstain rule it answers under (:mod:`dundi.serving.abstain`), one
entry point for the service and the CLI alike."""

from __future__ import annotations

import dataclasses
import os

from dundi.errors import DundiError
from dundi.rule.abstain_store import CALIBRATION_LIMIT
from dundi.rule.params import TwoStepRule
from dundi.run.directory import Run
from dundi.serving.abstain import abstain_settings
from dundi.serving.errors import RequestError
from dundi.serving.model import LoadedModel, ModelConfig


def served_model(run: str | os.PathLike, rule: TwoStepRule, abstain_threshold: float | str | None = None,
                 false_abstain: float | None = None, data_dir: str | None = None, limit: int | None = CALIBRATION_LIMIT,
                 loaded: Run | None = None, certify_eps: float | None = None, certificates: bool = True
                 ) -> tuple[ModelConfig, LoadedModel, str]:
    """A run as `dundi serve` and `dundi classify RUN IMAGES` serve it: its config, the loaded
    model and one line saying where its abstain rule comes from (:func:`abstain_settings`).
    ``loaded``: the run already loaded, not read again; ``certify_eps``: answers carry a
    certificate at that L∞ radius (one interval pass) instead of the full radius;
    ``certificates`` false: a certified run answers without any."""
    try:
        config = ModelConfig.of(os.path.abspath(run), rule, certify_eps=certify_eps, certificates=certificates)
    except RequestError as exc:
        raise DundiError(exc.message) from None
    if abstain_threshold is not None and false_abstain is not None:
        raise DundiError("give --abstain-threshold or --false-abstain, not both")
    model = LoadedModel(config, run=loaded)  # fails early, with the loader's message, on a bad run
    fields, how = abstain_settings(model, abstain_threshold, false_abstain, data_dir, limit)
    if not any(v is not None for v in fields.values()):
        return config, model, how
    config = dataclasses.replace(config, **fields)
    return config, LoadedModel(config, run=model.run), how  # the same run, other abstain settings
