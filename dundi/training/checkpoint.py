"""Training checkpoints: weights, optimizer and RNG state as safetensors, the rest as JSON.

Shared by the local loop (:func:`dundi.training.loop.fit`, which resumes a killed ``dundi train``) and
the Ray Train workers (``dundi.distributed.train_job``). Nothing here unpickles: a checkpoint
is tensors plus ``state.json``, which is written last, so a checkpoint without it is
incomplete and refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from dundi.errors import DundiError
from dundi.files import atomic_write_json

CHECKPOINT_FORMAT = 1
STATE_FILE = "state.json"          # written last: a checkpoint without it is incomplete
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
LATEST_FILE = "latest.json"        # local checkpoints: which epoch directory is the newest


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state_dict → (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        pid, key = flat.split("/", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def write_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     state: dict) -> None:
    """Weights, optimizer state and RNG state as safetensors; ``state.json`` last."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(directory / MODEL_FILE))
    tensors, rest = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(directory / OPTIM_FILE))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(directory / RNG_FILE))
    atomic_write_json(directory / STATE_FILE, {**state, "optimizer": rest, "format": CHECKPOINT_FORMAT})


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict, dict, dict, dict]:
    """(state, model tensors, optimizer state_dict, rng tensors) of a checkpoint directory."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / STATE_FILE).exists():
        raise DundiError(f"checkpoint {directory} is incomplete (no {STATE_FILE})")
    state = json.loads((directory / STATE_FILE).read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise DundiError(f"checkpoint {directory} has format {state.get('format')}, "
                         f"this DunDi reads format {CHECKPOINT_FORMAT}")
    optimizer = _unflatten_optimizer(load_file(str(directory / OPTIM_FILE)), state.pop("optimizer"))
    return state, load_file(str(directory / MODEL_FILE)), optimizer, load_file(str(directory / RNG_FILE))


def save_local(root: Path, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               state: dict) -> None:
    """A local run's checkpoint of ``epoch``: a fresh ``epoch-NNNN`` directory, then the
    ``latest.json`` pointer (atomic), then older directories removed. A kill at any point
    leaves the previous checkpoint readable."""
    directory = root / f"epoch-{epoch:04d}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    write_checkpoint(directory, model, optimizer, {**state, "epoch": epoch})
    atomic_write_json(root / LATEST_FILE, {"directory": directory.name})
    for old in root.glob("epoch-*"):
        if old != directory:
            shutil.rmtree(old, ignore_errors=True)


def load_local(root: Path) -> tuple[dict, dict, dict, dict] | None:
    """The newest local checkpoint under ``root`` (see :func:`read_checkpoint`), or None."""
    pointer = root / LATEST_FILE
    if not pointer.exists():
        return None
    return read_checkpoint(root / json.loads(pointer.read_text())["directory"])
