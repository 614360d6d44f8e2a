"""DunDi: robust classification by distance metric learning (Cui et al., ICCS 2019).

The package is a Ray-free core in rooms (``rule``, ``nets``, ``training``, ``attacks``,
``robustness``, ``evaluation``, ``run``, ``data``, ``serving``), the Ray edge
(``dundi.distributed``) and the CLI (``dundi.cli``); docs/ARCHITECTURE.md is the map. Core
modules never import ray.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# Module paths users imported before the core was arranged in rooms, and their new homes.
# Why a finder rather than files: the old names keep working without cluttering `ls dundi/`.
MOVED_MODULES = {
    "dundi.artifacts": "dundi.run.directory",
    "dundi.oracle": "dundi.rule.index",
    "dundi.train": "dundi.training.passes",
    "dundi.pipeline": "dundi.run.pipeline",
    "dundi.evaluate": "dundi.evaluation.evaluate",
    "dundi.certificate": "dundi.robustness.certificate",
    "dundi.classify": "dundi.rule.reference",
    "dundi.models": "dundi.nets.models",
    "dundi.results": "dundi.evaluation.results",
    "dundi.inference": "dundi.nets.inference",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as a view of its new module (PEP 562 ``__getattr__``)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        new = MOVED_MODULES[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new}; import it from there", DeprecationWarning,
                      stacklevel=2)
        target = importlib.import_module(new)
        module.__getattr__ = lambda attr: getattr(target, attr)
        module.__all__ = [n for n in vars(target) if not n.startswith("_")]


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
