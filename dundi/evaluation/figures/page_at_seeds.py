"""The headline DunDi-AT vs Madry-style LeNet-5 comparison (AutoAttack on the exact rule, L∞ 0.3,
mnist-10k) over training seeds (docs/results/README.md): both models trained again at seeds 0, 1
and 2 and attacked on one fixed sample of 500 test images (the same images and attack draws for
every seed, so the rows differ by the training seed alone); each seed's row with its interval
and command, then the mean and range per model over the seeds whose raw file is committed. A
seed not yet run is named as such, never filled in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dundi.errors import DundiError
from dundi.evaluation.figures.raw import RESULTS, attack_row, evaluation_of, mean_range, raw_json, share, table
from dundi.evaluation.figures.registry import block

SEEDS = (0, 1, 2)
SAMPLE = 500     # run.sh's LIMIT: test images per evaluation, the same for every seed
SCRIPT = "docs/results/at/seeds/run.sh"
# (row label, model-name part of its evaluation, threat, key of its robust accuracy, clean key,
#  train file stem)
MODELS = (("DunDi-AT (LeNet-5, AT5-long), exact rule k = 5", f"eval-aa-{SAMPLE}-AT5", "adaptive",
           "robust_accuracy", "dundi", "AT5-long"),
          ("Madry-style LeNet-5, 40 epochs, white-box", f"eval-aa-{SAMPLE}-madry5", "transfer",
           "native_robust_accuracy", "native", "madry5"))


def seed_report(seed: int) -> str:
    """The raw file of one seed, relative to docs/results."""
    return f"at/seeds/s{seed}/report.json"


def _checked_train_seed(root: Path, seed: int, stem: str) -> None:
    """A seed's row stands only if its training file says it was trained at that seed."""
    train = raw_json(root, f"at/seeds/s{seed}/{stem}-train.json")
    if train["config"]["seed"] != seed:
        raise DundiError(f"published figures: at/seeds/s{seed}/{stem}-train.json was trained at seed "
                         f"{train['config']['seed']}, its row says seed {seed}")


def _figures(root: Path, seed: int) -> list[tuple[float, float, int]] | None:
    """(clean, robust, sample size) per model for one seed; None when its report is not committed."""
    if not (root / RESULTS / seed_report(seed)).is_file():
        return None
    report = raw_json(root, seed_report(seed))
    out = []
    for _, part, threat, key, clean_key, stem in MODELS:
        _checked_train_seed(root, seed, stem)
        evaluation: dict[str, Any] = evaluation_of(report, part)
        row = attack_row(evaluation, "autoattack", threat, 0.3)
        n = evaluation["clean_accuracy"]["count"]
        if row["count"] != n or n != SAMPLE:
            raise DundiError(f"published figures: {seed_report(seed)} attacked {row['count']} of {n} images, "
                             f"not the {SAMPLE} of every seed")
        out.append((evaluation["clean_accuracy"][clean_key], row[key], n))
    return out


def _command(seed: int) -> str:
    return f"`SEEDS={seed} {SCRIPT}`"


@block("at-seeds")
def _at_seeds(root: Path) -> str:
    per_seed = {seed: _figures(root, seed) for seed in SEEDS}
    done = [seed for seed in SEEDS if per_seed[seed] is not None]
    rows = []
    for index, (label, *_rest) in enumerate(MODELS):
        for seed in SEEDS:
            figures = per_seed[seed]
            if figures is None:
                rows.append([label, f"seed {seed}", "not run or not committed yet", f"no raw file `{seed_report(seed)}`", "",
                             _command(seed)])
                continue
            clean, robust, n = figures[index]
            rows.append([label, f"seed {seed}", share(clean, n), f"**{share(robust, n)}**", f"`{seed_report(seed)}`",
                         _command(seed)])
        seeds_text = ", ".join(str(s) for s in done)
        if len(done) < 2:
            alone = f"only seed {seeds_text} committed" if done else "no seed committed yet"
            rows.append([label, "**mean (range)**", f"no spread: {alone}", "", "", ""])
            continue
        cleans = [per_seed[s][index][0] for s in done]
        robusts = [per_seed[s][index][1] for s in done]
        rows.append([label, f"**mean (range), seeds {seeds_text}**", mean_range(cleans), f"**{mean_range(robusts)}**",
                     "", "" if len(done) == len(SEEDS) else f"{len(SEEDS) - len(done)} of {len(SEEDS)} seeds missing"])
    return table([f"Model (mnist-10k, the same {SAMPLE} test images for every seed)", "training seed", "clean [95% CI] (count)",
                  "AutoAttack robust, L∞ 0.3 [95% CI] (count)", "raw file (docs/results/)", "command"], rows)
