"""Defaults and accepted values of the training and classification flags, importable without
torch, FAISS or numpy.

Building the parser must stay cheap: ``dundi --help``, ``--version`` and every mistyped flag
are answered before any command runs, and importing torch alone takes seconds (minutes on a
busy machine). The values mirror :class:`dundi.training.config.TrainConfig` and the modules that define
them (``dundi.training.config``, ``dundi.training.losses``, ``dundi.rule.params``, ``dundi.nets.models``,
``dundi.data.specs``, ``dundi.serving.answers``, ``dundi.evaluation.evaluate``);
tests/test_cli_messages.py fails if they ever disagree.
"""

from __future__ import annotations

from typing import Any

ARCHITECTURES: tuple[str, ...] = ("lenet1", "lenet4", "lenet5", "cnn-ibp", "cnn-ibp-medium", "cnn7", "vgg16")  # dundi.nets.models
DATASETS: tuple[str, ...] = ("mnist", "mnist-10k", "fashion-mnist", "cifar10")  # dundi.data.specs
SPLITS: tuple[str, ...] = ("train", "test")                                   # dundi.data.specs
LOSSES: tuple[str, ...] = ("sigmoid", "margin")                               # dundi.training.losses
METRICS: tuple[str, ...] = ("euclidean", "sqeuclidean")                       # dundi.rule.params
MINING: tuple[str, ...] = ("random", "batch-hard")                            # dundi.training.config
ADV_TARGETS: tuple[str, ...] = ("classes", "tuple")                           # dundi.training.config
ADV_LOSSES: tuple[str, ...] = ("prototype", "triplet")                        # dundi.training.config
CERT_HEADS: tuple[str, ...] = ("batch", "prototypes")                        # dundi.training.config
ORACLE_KINDS: tuple[str, ...] = ("images", "prototypes")                     # dundi.run.pipeline
CLASSIFY_FORMATS: tuple[str, ...] = ("table", "jsonl", "csv", "parquet")      # dundi.serving.answers
EVAL_SHARD_SIZE = 64                        # dundi.evaluation.evaluate.EvalConfig.shard_size

# dundi.training.config.TrainConfig's defaults for the fields the CLI exposes
TRAIN_DEFAULTS: dict[str, Any] = {
    "dataset": "mnist-10k", "arch": "lenet5", "epochs": 5, "batch_size": 128, "lr": 1e-3, "seed": 0,
    "tuples": 60_000, "loss": "sigmoid", "margin": 1.0, "mining": "random", "embed_dim": 128,
    "val_fraction": 0.1, "adv_eps": 0.3, "adv_steps": 10, "adv_mix": 0.5, "adv_warmup": 0,
    "adv_target": "classes", "adv_loss": "prototype", "cert_eps": 0.3, "cert_mix": 0.5,
    "cert_warmup": 3.0, "cert_ramp": 30.0, "cert_per_class": 20,
    "cert_head": "batch",
}
