"""Adversarial-evaluation results as Parquet: the row schema, atomic shard files, the merge to
one table with exactly one row per key, its cost, and the Wilson interval every figure
carries. The summaries the report prints are computed in :mod:`dundi.evaluation.summary`.

An evaluation directory holds::

    evaluation.json           the configuration and the shard plan (written by `dundi evaluate`)
    shards/<shard>.parquet    one file per finished shard, written atomically

A shard is one (attack, eps, threat model, slice of test samples); its file holds one row per
sample of the slice. The key of a row is (sample_id, attack, eps, threat). A shard file only
exists once it is complete (temporary file + ``os.replace``), so a killed evaluation leaves
either a finished shard or a ``*.tmp*`` file that :func:`finished_shards` ignores.

Nothing here imports Ray or pandas.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dundi.errors import DundiError

EVALUATION_FILE = "evaluation.json"
SHARD_DIR = "shards"
KEY = ("sample_id", "attack", "eps", "threat")
FINGERPRINT_META = b"dundi.fingerprint"
SHARD_META = b"dundi.shard"

# One row per (sample, attack, eps, threat). Predictions are class indices; "dundi_*" is the
# two-step rule with the evaluation's (n, m, k); "target_*" is the model the attack was run
# against (native logits for transfer, the differentiable DunDi scorer for adaptive, the
# nearest-oracle feature scorer for feature).
SCHEMA = pa.schema([
    ("sample_id", pa.int64()),        # id of the test sample in the dataset cache
    ("position", pa.int64()),         # position in the evaluated slice of the split
    ("attack", pa.string()),
    ("eps", pa.float64()),            # budget in the attack's norm: Linf/L2 radius; JSMA: gamma,
                                      # the largest fraction of pixels changed; inf: unbounded
    ("threat", pa.string()),          # transfer | adaptive | feature
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("label", pa.int64()),            # true label
    ("norm", pa.string()),            # Linf | L2 | L0
    ("steps", pa.int64()),            # configured iterations (1 for FGSM)
    ("steps_used", pa.int64()),       # iterations this sample used (early stop: iFGSM-a, DeepFool)
    ("attack_params", pa.string()),   # JSON: every setting of the attack
    ("target_model", pa.string()),
    ("native_clean", pa.int64()),
    ("native_adv", pa.int64()),
    ("dundi_clean", pa.int64()),
    ("dundi_adv", pa.int64()),
    ("target_clean", pa.int64()),
    ("target_adv", pa.int64()),
    ("n", pa.int64()),
    ("m", pa.int64()),
    ("k", pa.int64()),
    ("n_values", pa.list_(pa.int64())),          # oracle counts also evaluated (Table 1, Fig. 7)
    ("dundi_clean_at_n", pa.list_(pa.int64())),  # two-step label at each n of n_values
    ("dundi_adv_at_n", pa.list_(pa.int64())),
    ("l0", pa.int64()),               # pixels changed by more than L0_TOL
    ("l2", pa.float64()),
    ("linf", pa.float64()),
    ("adv_min", pa.float32()),        # pixel range of the adversarial image
    ("adv_max", pa.float32()),
    ("grad_norm", pa.float64()),      # ‖∇x loss‖ of the target model at the clean input
    ("target_class", pa.int64()),     # class a targeted attack aimed at (JSMA: random), else -1
    ("attack_success", pa.bool_()),   # the target model misclassifies the adversarial input
    ("defense_success", pa.bool_()),  # DunDi (two-step, n/m/k) classifies it correctly
    ("adv", pa.binary()),             # float32 CHW adversarial image when saved, else null
])

L0_TOL = 1e-6  # a pixel counts as changed when it moved by more than this (float32 round-off)


# ---- shard files -------------------------------------------------------------------------

def shard_dir(out: str | os.PathLike) -> Path:
    return Path(out) / SHARD_DIR


def shard_path(out: str | os.PathLike, name: str) -> Path:
    return shard_dir(out) / f"{name}.parquet"


def shard_name(attack: str, eps: float, threat: str, start: int, stop: int, settings: str = "") -> str:
    """A file-name-safe, unique, sortable name for one shard. ``settings`` identifies the
    attack's other settings (steps, step size, loss, ...), so changing them makes new shards."""
    tag = f"__{settings}" if settings else ""
    return f"{threat}__{attack}__eps{eps:.6g}{tag}__{start:07d}-{stop:07d}"


def write_shard(out: str | os.PathLike, name: str, table: pa.Table, fingerprint: str,
                rows: int | None = None) -> Path:
    """Write one finished shard atomically; its fingerprint goes into the Parquet metadata.
    ``rows``: the size of the shard's slice; a table of another length is refused, never
    written (a resumed evaluation would take it as finished and lose samples)."""
    if rows is not None and table.num_rows != rows:
        raise DundiError(f"shard {name} has {table.num_rows} rows for a slice of {rows} samples: not "
                         f"written (the evaluator held another sample list; rerun the evaluation)")
    table = table.cast(SCHEMA).replace_schema_metadata(
        {FINGERPRINT_META: fingerprint.encode(), SHARD_META: name.encode()})
    path = shard_path(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def finished_shards(out: str | os.PathLike, fingerprint: str | None = None) -> dict[str, Path]:
    """Shard name → path for every complete shard file. Temporary files (``*.tmp*``) are
    partial writes and are ignored; so are unreadable files and, when ``fingerprint`` is given,
    shards written by an evaluation with another configuration."""
    found: dict[str, Path] = {}
    directory = shard_dir(out)
    if not directory.is_dir():
        return found
    for path in sorted(directory.glob("*.parquet")):
        try:
            meta = pq.read_schema(path).metadata or {}
        except (OSError, pa.ArrowInvalid):
            continue  # not a complete Parquet file: the shard counts as unfinished
        if fingerprint is not None and meta.get(FINGERPRINT_META, b"").decode() != fingerprint:
            continue
        found[path.name[: -len(".parquet")]] = path
    return found


EVALUATION_KEYS = ("fingerprint", "plan", "shards")  # what reading the results needs of the file


def read_evaluation(out: str | os.PathLike) -> dict:
    """The evaluation directory's plan and settings (``evaluation.json``), or one line saying
    what is wrong with it: missing, or damaged (cut short by a full disk, edited by hand)."""
    path = Path(out) / EVALUATION_FILE
    try:
        evaluation = json.loads(path.read_text())
    except FileNotFoundError:
        raise DundiError(f"{out} holds no evaluation ({EVALUATION_FILE} missing): "
                         f"run `dundi evaluate RUN --native NATIVE --out {out}` first") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DundiError(f"{path} is damaged (not JSON: {exc}); move {out} aside and rerun "
                         f"`dundi evaluate ... --out {out}`") from None
    missing = [k for k in EVALUATION_KEYS if not isinstance(evaluation, dict) or k not in evaluation]
    if missing:
        raise DundiError(f"{path} is damaged (no {', '.join(missing)}): `dundi evaluate` did not write "
                         f"it; move {out} aside and rerun `dundi evaluate ... --out {out}`")
    return evaluation


def read_results(out: str | os.PathLike, require_complete: bool = False) -> pa.Table:
    """All rows of an evaluation directory: the shards of its plan, merged, exactly one row per
    key. Shards outside the plan or of another configuration are ignored; a duplicated key
    (two plan shards covering one sample) is an error, never silently dropped."""
    evaluation = read_evaluation(out)
    plan = evaluation["plan"]
    done = finished_shards(out, evaluation["fingerprint"])
    missing = [name for name in plan if name not in done]
    if missing and require_complete:
        raise DundiError(f"{out}: {len(missing)} of {len(plan)} shards are not finished "
                         f"(e.g. {missing[0]}); rerun the same `dundi evaluate` to complete them")
    tables = [pq.read_table(done[name]).replace_schema_metadata(None) for name in plan if name in done]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    check_unique(table)
    return table


def check_unique(table: pa.Table) -> None:
    keys = list(zip(*(table.column(c).to_pylist() for c in KEY)))
    if len(set(keys)) != len(keys):
        seen: set = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise DundiError(f"results hold key {dup} more than once; the shard files overlap")


# ---- intervals ------------------------------------------------------------------------------

def wilson_interval(successes: int, count: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: unlike the normal approximation it stays
    inside [0, 1] and is honest at 0 or 100% (a robust accuracy of 1.0 on 32 samples is
    [0.89, 1.0], not [1.0, 1.0]). NaN for no samples."""
    if count <= 0:
        return float("nan"), float("nan")
    p = successes / count
    centre = (p + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    return max(0.0, centre - half), min(1.0, centre + half)


def repo_relative(path: str | os.PathLike | None, root: str | os.PathLike | None = None) -> str | None:
    """How a published file (a report, a results page) names a run or an evaluation: relative
    to the repository (``root``; default the checkout holding this package, else the working
    directory), never as an absolute path of the machine that made it. A path outside the
    repository keeps only its last two parts, marked as such (``<outside>/at/AT5``)."""
    if path is None or str(path) == "":
        return None if path is None else ""
    p = Path(path).resolve()
    roots = [Path(root).resolve()] if root else [Path(__file__).resolve().parents[1], Path.cwd().resolve()]
    for base in roots:
        if p == base or base in p.parents:
            return p.relative_to(base).as_posix() or "."
    return "<outside>/" + "/".join(p.parts[-2:])


TIMING_FILE = "timing.jsonl"


def record_timing(out: str | os.PathLike, timing: dict[str, Any]) -> None:
    """Append one call's cost (mode, workers, cores, wall and CPU seconds, image-attacks
    evaluated) to ``timing.jsonl``: a resumed evaluation's cost is the sum over its calls.
    One line per call, written with a single append (a killed call leaves no line, its
    shards count again in the call that finishes them)."""
    keep = ("mode", "workers", "cores", "seconds", "cpu_seconds", "rows", "shards_run", "node_count")
    line = json.dumps({k: timing[k] for k in keep if k in timing}, sort_keys=True) + "\n"
    with open(Path(out) / TIMING_FILE, "a", encoding="utf-8") as fh:
        fh.write(line)


def cost(out: str | os.PathLike) -> dict[str, Any]:
    """What the evaluation cost over every call that ran shards: image-attacks (rows)
    evaluated, wall seconds, core-seconds (cores held × wall: what a cluster bills), the rate
    in image-attacks per second and core-seconds per 1,000 image-attacks."""
    path = Path(out) / TIMING_FILE
    calls = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    calls = [c for c in calls if c.get("rows")]
    rows = sum(c["rows"] for c in calls)
    wall = sum(c["seconds"] for c in calls)
    core_s = sum(c["seconds"] * c.get("cores", c.get("workers", 1)) for c in calls)
    return {"calls": len(calls), "image_attacks": rows, "seconds": round(wall, 3),
            "core_seconds": round(core_s, 3),
            "image_attacks_per_second": rows / wall if wall > 0 else float("nan"),
            "core_seconds_per_1000": 1000 * core_s / rows if rows else float("nan")}


def json_safe(obj: Any) -> Any:
    """NaN → None, recursively, so summaries are valid JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj



__all__ = ["SCHEMA", "KEY", "shard_name", "write_shard", "finished_shards", "read_results",
           "read_evaluation", "json_safe", "wilson_interval", "record_timing", "cost", "repo_relative"]
