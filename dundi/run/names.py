"""The kinds of oracles a run's index can hold, importable without torch: `dundi index build
--oracle-kind` lists them before any run is loaded (dundi.run.pipeline builds them)."""

from __future__ import annotations

# images: n training images per class; prototypes: a --cert-head prototypes run's learned
# class prototypes themselves
ORACLE_KINDS: tuple[str, ...] = ("images", "prototypes")
ORACLE_SEED = 0  # the seed that picks a class's n oracles unless told otherwise
