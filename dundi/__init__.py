"""DunDi: robust classification by distance metric learning (Cui et al., ICCS 2019).

The package is split in two (see docs/ARCHITECTURE.md): a Ray-free core (this package's
top-level modules, ``dundi.data`` and ``dundi.attacks``) and the Ray edge
(``dundi.distributed`` and ``dundi.cli``). Core modules never import ray.
"""

__version__ = "0.1.0"
