"""DunDi: robust classification by distance metric learning (Cui et al., ICCS 2019).

The package is a Ray-free core in rooms (``rule``, ``nets``, ``attacks``, ``training``,
``robustness``, ``run``, ``evaluation``, ``serving``, ``data``), the Ray edge
(``dundi.distributed``) and the CLI (``dundi.cli``); docs/ARCHITECTURE.md is the map. Core
modules never import ray.
"""

__version__ = "0.1.0"
