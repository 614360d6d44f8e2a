"""Abstain rates of a run's calibrated rule on clean and out-of-distribution MNIST-size inputs.

    python docs/results/abstain/measure.py RUN [RUN ...] > docs/results/abstain/measure.jsonl

For each run: the median nearest-oracle distance of each probe set beside the held-out
images' median and 99th percentile (first line, rule "nearest-oracle distance (no rule)");
then calibrate at a 1 % false-abstain rate on the validation part of the train
split (dundi.serving.abstain.calibrate_rule), once with the nearest-oracle distance alone and
once with all signals, then measure the share of abstained answers on the mnist-10k test
split (clean), the same digits inverted (1 - x), uniform noise and Fashion-MNIST test images.
"""

import json
import sys

import numpy as np
import torch

from dundi.data import load_split
from dundi.serving.abstain import LEGACY_FIELDS, SIGNALS, abstain_flags, calibrate_rule, held_out_images, signal_values
from dundi.serving.model import LoadedModel, ModelConfig

LIMIT = 2000


def probes() -> dict[str, np.ndarray]:
    test, _, _ = load_split("mnist-10k", "test", None, limit=LIMIT)
    fashion, _, _ = load_split("fashion-mnist", "test", None, limit=LIMIT)
    noise = np.random.default_rng(0).random(test.shape, dtype=np.float32)
    return {"clean test": test, "inverted": 1.0 - test, "uniform noise": noise, "fashion-mnist": fashion}


def measure(run: str, sets: dict[str, np.ndarray]) -> list[dict]:
    model = LoadedModel(ModelConfig(run=run))
    images, labels, source = held_out_images(model.run, None, limit=LIMIT)
    values = {}
    for name, x in sets.items():
        emb = model.run.embed(x)
        r = model.run.oracle.classify(emb, model.rule)
        values[name] = signal_values(x, emb, r.nearest_distance)
    held = model.run.oracle.classify(model.run.embed(images), model.rule)
    rows = [{"run": run, "rule": "nearest-oracle distance (no rule)", "calibration": source,
             "held-out median": float(np.median(held.nearest_distance)),
             "held-out 99th percentile": float(np.quantile(held.nearest_distance, 0.99)),
             **{name: float(np.median(v["abstain_threshold"])) for name, v in values.items()}}]
    rules = {"distance only": ("abstain_threshold",), "all signals": LEGACY_FIELDS}
    rules.update({f"{SIGNALS[f][0]} only": (f,) for f in LEGACY_FIELDS if f != "abstain_threshold"})
    for rule, fields in rules.items():
        cal = calibrate_rule(model, images, labels, rate=0.01, fields=fields)
        rates = {name: float(abstain_flags(v, cal["thresholds"]).mean()) for name, v in values.items()}
        rows.append({"run": run, "rule": rule, "calibration": source, "calibration_rate": cal["abstain_rate"],
                     "thresholds": cal["thresholds"], "count": LIMIT, **rates})
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    sets = probes()
    for run in sys.argv[1:]:
        for row in measure(run, sets):
            print(json.dumps(row), flush=True)
