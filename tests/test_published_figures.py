"""The published figures agree with the committed raw files.

Reads files only (no training, no evaluation): every `<!-- figures:NAME -->` block of README.md
and docs/** must be what `python -m dundi.evaluation.figures` renders from its raw file, every
rate quoted with a 95% interval must carry the Wilson interval of its count, and the prose
figures that were once copied by hand and drifted are recomputed here from their raw files.
The last tests plant wrong figures in a copy of the pages and check that each is caught.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dundi.errors import DundiError
from dundi.evaluation import figures
from dundi.evaluation.results import wilson_interval

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def _report(rel: str) -> dict:
    return json.loads((RESULTS / rel).read_text())


def _page(rel: str) -> str:
    return " ".join((ROOT / rel).read_text().split())


def test_every_block_is_rendered_from_its_raw_file():
    blocks = [(page, m["name"]) for page in figures.pages(ROOT)
              for m in figures.BLOCK.finditer(page.read_text())]
    assert len(blocks) >= 8, blocks  # the headline tables are generated, not typed
    assert figures.stale_blocks(ROOT) == []


def test_every_quoted_interval_is_the_wilson_interval_of_its_count():
    errors = {str(p.relative_to(ROOT)): figures.interval_errors(p.read_text()) for p in figures.pages(ROOT)}
    assert {p: e for p, e in errors.items() if e} == {}


def test_wilson_interval_matches_an_independent_computation():
    # the score interval solved as a quadratic in p: (p̂ - p)^2 = z^2 p (1 - p) / n
    z, k, n = 1.959964, 1648, 2000
    p_hat = k / n
    a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
    roots = sorted(((-b - s) / (2 * a), (-b + s) / (2 * a)) for s in [(b * b - 4 * a * c) ** 0.5])[0]
    assert wilson_interval(k, n) == pytest.approx(roots, abs=1e-12)
    assert figures.wilson_text(k, n) == "80.7–84.0"


# ---- prose figures that drifted once, recomputed from their raw files ------------------------

def _natives(attack: str) -> list[float]:
    report = _report("mnist-10k/report.json")
    return [a["native_robust_accuracy"] for e in report["evaluations"] if "tuples" not in e["model"]
            or "(360000" in e["model"] for a in e["attacks"] if a["attack"] == attack and a["threat"] == "transfer"]


def test_natives_keep_what_the_json_says():
    fgsm, jsma = _natives("fgsm"), _natives("jsma")
    text = _page("docs/results/README.md")
    assert (f"{figures.pct(min(fgsm), 1)[:-1]}–{figures.pct(max(fgsm), 1)} (FGSM" in text
            and f"{figures.pct(min(jsma), 1)[:-1]}–{figures.pct(max(jsma), 1)} (JSMA" in text)


def test_feature_square_figure():
    at_long = next(e for e in _report("at/report.json")["evaluations"] if "AT5-long" in e["model"])
    square = next(a for a in at_long["attacks"] if a["attack"].startswith("square") and a["threat"] == "feature")
    worst = next(w["robust_accuracy"] for w in at_long["worst_case"] if w["threat"] == "feature" and w["eps"] == 0.3)
    assert f"| {figures.pct(square['robust_accuracy'], 1)} | **{figures.pct(worst, 1)} [" in _page("docs/results/README.md")


def test_pgd_step_size_and_zero_gradient_share():
    report = _report("mnist-10k/report.json")
    pgd40 = [a for e in report["evaluations"] for a in e["attacks"] if a["attack"].startswith("pgd[") and "steps=40" in a["attack"]]
    alphas = {a["attack_params"]["alpha"] for a in pgd40}
    assert alphas == {0.01}
    text = _page("docs/results/README.md")
    assert "40 steps of 0.01" in text and "2.5·eps/40" not in text
    worst = max(pgd40, key=lambda a: a["zero_gradient_fraction"])
    assert f"up to {figures.pct(worst['zero_gradient_fraction'], 1)} of samples" in text


def test_gap_to_the_paper_table1():
    paper = _report("paper.json")["table1_mnist"]
    ours: dict[str, dict[int, float]] = {}
    for line in (RESULTS / "mnist-10k/table1_full_test.jsonl").read_text().splitlines():
        row = json.loads(line)
        ours.setdefault(row["run"].rsplit("/", 1)[-1], {})[row.get("n", 1)] = row["accuracy"]
    gaps = [published - 100 * ours[name][n] for name, values in paper.items()
            for n, published in zip((1, 10, 20), values)]
    assert f"{min(gaps):.1f}–{max(gaps):.1f} points below the paper" in _page("docs/results/README.md")


def _mean_defense_success(rel: str, models: tuple[str, ...]) -> float:
    report = _report(rel)
    rates = [v for name in models for v in report["fig6"][figures.paper_model(report, name)["model"]].values()]
    return sum(rates) / len(rates)


def test_readme_transfer_averages():
    """The README's prose averages are the rendered Fig. 6 means of their raw files."""
    full = figures.pct(_mean_defense_success("mnist/report.json", figures.SIX), 1)
    small = figures.pct(_mean_defense_success("mnist-10k/report.json", figures.SIX), 1)
    at = _report("at/report.json")
    long = next(v for k, v in at["fig6"].items() if "AT5-long" in k)
    text = _page("README.md")
    assert f"average defense success is {full} against the paper's 94.39% ({small} on mnist-10k)" in text
    shared = json.loads((RESULTS / "mnist/shared-source/transfer.json").read_text())
    six = [sum(f["defense_success"] for f in t["attacks"].values()) / len(t["attacks"])
           for t in shared["targets"] if t["kind"] == "dundi"]
    assert len(six) == 6
    assert f"and {figures.pct(sum(six) / 6, 1)} when," in text                # the shared-source mean of the six
    assert f"{figures.pct(sum(long.values()) / 4, 1)} on average" in text


# ---- the checks can fail ---------------------------------------------------------------------

@pytest.fixture
def copy_root(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    return tmp_path


def test_a_planted_figure_in_a_block_is_caught(copy_root: Path):
    readme = copy_root / "README.md"
    readme.write_text(readme.read_text().replace("**80.15% [78.3–81.8]", "**81.15% [78.3–81.8]", 1))
    assert figures.stale_blocks(copy_root) == ["README.md: autoattack"]
    assert figures.main(["--root", str(copy_root), "--check"]) == 1
    assert figures.main(["--root", str(copy_root)]) == 0          # rendering repairs it
    assert figures.stale_blocks(copy_root) == []


def test_a_changed_raw_file_is_caught(copy_root: Path):
    raw = copy_root / "docs/results/at-full/report.json"
    raw.write_text(raw.read_text().replace('"native_robust_accuracy": 0.824', '"native_robust_accuracy": 0.825'))
    assert "README.md: autoattack" in figures.stale_blocks(copy_root)


def test_a_missing_raw_file_fails_naming_it(copy_root: Path, capsys):
    (copy_root / "docs/results/certified/mnist-full-certify.json").unlink()
    with pytest.raises(DundiError, match="mnist-full-certify.json is missing"):
        figures.stale_blocks(copy_root)
    assert figures.main(["--root", str(copy_root), "--check"]) == 2
    assert "mnist-full-certify.json is missing" in capsys.readouterr().err


@pytest.mark.parametrize("planted", [
    "a Madry-style LeNet-5 **82.40%** robust white-box [80.6–84.1], clean 97.90%",   # was in README
    "DunDi-AT **80.15% robust accuracy** [95% CI 78.3–81.9] on 2,000",
    "82.05% [80.3–83.7] (1,640/2,000)",
])
def test_a_wrong_interval_is_caught(planted: str):
    assert figures.interval_errors(planted) != []


def test_an_unknown_block_is_refused(copy_root: Path):
    readme = copy_root / "README.md"
    readme.write_text(readme.read_text() + "\n<!-- figures:nonesuch -->\n<!-- /figures -->\n")
    with pytest.raises(DundiError, match="unknown block 'nonesuch'"):
        figures.stale_blocks(copy_root)


# ---- the spread over training seeds (DunDi-AT vs Madry, whole mnist-10k split) ----------------

def _plant_seed(root: Path, seed: int, at_robust: float, train_seed: int | None = None) -> None:
    """A seed's raw files: the published whole-split report made into one on the seeds' 500-image
    sample (clean 486/500 and 482/500, Madry 397/500 robust) with DunDi-AT's robust accuracy
    ``at_robust``, and the two training files naming train_seed (default: the seed)."""
    report = json.loads((root / "docs/results/autoattack/whole-split/report.json").read_text())
    for evaluation in report["evaluations"]:
        evaluation["model"] = evaluation["model"].replace("eval-aa-whole-", "eval-aa-500-")
        evaluation["clean_accuracy"].update(count=500, dundi=0.972, native=0.964)
        for row in evaluation["attacks"]:
            row["count"] = 500
            row["robust_accuracy"] = at_robust if row["threat"] == "adaptive" else row["robust_accuracy"]
            row["native_robust_accuracy"] = 0.794 if row["threat"] == "transfer" else row["native_robust_accuracy"]
    out = root / f"docs/results/at/seeds/s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report))
    for stem in ("AT5-long", "madry5"):
        (out / f"{stem}-train.json").write_text(json.dumps({"config": {"seed": seed if train_seed is None else train_seed}}))


def test_seed_spread_is_the_mean_and_range_of_the_committed_seeds(copy_root: Path):
    shutil.rmtree(copy_root / "docs/results/at/seeds", ignore_errors=True)
    render = figures.renderers()["at-seeds"]
    alone = render(copy_root)
    assert alone.count("not run or not committed yet") == 6 and alone.count("no seed committed yet") == 2
    _plant_seed(copy_root, 0, 0.802)
    assert "no spread: only seed 0 committed" in render(copy_root)
    _plant_seed(copy_root, 1, 0.812)
    text = render(copy_root)
    assert "| seed 1 | 97.20% [95.4–98.3] (486/500) | **81.20% [77.5–84.4] (406/500)** |" in text
    assert "**80.70% (80.20%–81.20%)**" in text                         # DunDi-AT: mean, range of seeds 0, 1
    assert "**79.40% (79.40%–79.40%)**" in text                          # Madry: the same at both seeds here
    assert text.count("1 of 3 seeds missing") == 2 and text.count("not run or not committed yet") == 2


def test_a_seed_on_another_sample_is_refused(copy_root: Path):
    report_dir = copy_root / "docs/results/at/seeds/s1"
    _plant_seed(copy_root, 1, 0.8)
    report = json.loads((report_dir / "report.json").read_text())
    report["evaluations"][0]["clean_accuracy"]["count"] = 2000
    (report_dir / "report.json").write_text(json.dumps(report))
    with pytest.raises(DundiError, match="not the 500 of every seed"):
        figures.renderers()["at-seeds"](copy_root)


def test_a_seed_trained_at_another_seed_is_refused(copy_root: Path):
    _plant_seed(copy_root, 2, 0.8015, train_seed=0)
    with pytest.raises(DundiError, match="trained at seed 0, its row says seed 2"):
        figures.renderers()["at-seeds"](copy_root)


# ---- bookkeeping: what each evaluation used, how long each stage took ---------------------------

def test_environment_states_each_evaluations_sample_from_its_report():
    from dundi.evaluation.figures.samples import PREFIX, sample_lines

    stated = [line for line in (RESULTS / "environment.txt").read_text().splitlines() if line.startswith(PREFIX)]
    # at/seeds/s*/report.json land while their runs finish; environment.txt describes them in prose
    expected = [line for line in sample_lines(ROOT) if not line.startswith(f"{PREFIX}at/seeds/")]
    assert stated == expected
    assert "samples per evaluation: 500" not in (RESULTS / "environment.txt").read_text()


def test_stage_log_rows_are_seconds_or_unknown_with_their_source():
    rows = [line.split("\t") for line in (RESULTS / "stages.tsv").read_text().splitlines()
            if line and not line.startswith("#")]
    assert all(len(row) in (2, 3) for row in rows), [r for r in rows if len(r) not in (2, 3)]
    for row in rows:
        assert row[1].isdigit() or (row[1] == "unknown" and len(row) == 3), row
    named = {row[0] for row in rows}
    for stage in ("runs/results/at/AT5-long", "runs/results/at-full/madry5", "runs/results/at-full/AT5-long",
                  "runs/results/cert/mnist-C", "runs/results/cert/mnist-full-C40", "runs/results/mnist/R5"):
        assert stage in named, stage
