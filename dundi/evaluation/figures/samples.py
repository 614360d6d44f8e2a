"""What each committed evaluation used: one line per report.json under docs/results, its
dataset and how many test images it attacked, read from the report itself. environment.txt
carries these lines (reproduce.sh writes them; tests/test_published_figures.py checks them), so
the page cannot claim one sample size for evaluations that used several."""

from __future__ import annotations

import json
from pathlib import Path

from dundi.evaluation.figures.raw import RESULTS

# images in each dataset's test split, as the reports use it (mnist-10k keeps 2,000 of its 10,000)
TEST_SPLIT = {"mnist-10k": 2000, "mnist": 10000, "fashion-mnist": 10000, "cifar10": 10000}
PREFIX = "evaluation: "


def sample_lines(root: Path) -> list[str]:
    """'evaluation: REL: N of M DATASET test images (whole split | seeded random choice)' per report."""
    lines = []
    for path in sorted((root / RESULTS).rglob("report.json")):
        evaluations = json.loads(path.read_text())["evaluations"]
        described = sorted({(e["dataset"], e["clean_accuracy"]["count"]) for e in evaluations})
        parts = []
        for dataset, count in described:
            split = TEST_SPLIT.get(dataset)
            how = "the whole split" if count == split else "a seeded random choice"
            parts.append(f"{count:,} of {split:,} {dataset} test images, {how}" if split
                         else f"{count:,} {dataset} test images")
        lines.append(f"{PREFIX}{path.relative_to(root / RESULTS)}: {'; '.join(parts)}")
    return lines


if __name__ == "__main__":
    print("\n".join(sample_lines(Path("."))))
