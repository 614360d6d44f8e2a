"""`dundi classify RUN IMAGES...`: one answer per image file, the same answers as the Python
API gives for the same pixels, in every output format."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dundi.cli.main import main
from dundi.rule.params import TwoStepRule
from dundi.run.directory import Run

DUNDI = [sys.executable, "-m", "dundi"]


@pytest.fixture(scope="module")
def digits(data_dir, tmp_path_factory):
    """12 test digits as PNGs (exact: the cache holds k/255 pixels), plus one noise image."""
    from dundi.data import load_split

    folder = tmp_path_factory.mktemp("pngs")
    x, y, _ = load_split("mnist-10k", "test", data_dir, limit=12)
    for i in range(len(x)):
        Image.fromarray(np.rint(x[i, 0] * 255).astype(np.uint8)).save(folder / f"d{i:02d}.png")
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    return folder, x, noise[None, None] / np.float32(255)


def _jsonl(capsys, argv: list[str]) -> list[dict]:
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_answers_match_the_python_api_for_the_same_pixels(mnist_runs, digits, capsys):
    folder, x, noise = digits
    rows = _jsonl(capsys, ["classify", str(mnist_runs["dundi"]), str(folder), "--format", "jsonl",
                           "--abstain-threshold", "none"])
    assert [r["file"].rsplit("/", 1)[1] for r in rows] == [f"d{i:02d}.png" for i in range(12)] + ["noise.png"]
    ref = Run.load(mnist_runs["dundi"]).classify(np.concatenate([x, noise]), TwoStepRule(m=3, k=5))
    assert [r["label"] for r in rows] == ref.labels.tolist()
    assert [r["topk_classes"] for r in rows] == ref.topk_classes.tolist()
    np.testing.assert_allclose([r["topk_scores"] for r in rows], ref.fine_scores, rtol=1e-5)
    np.testing.assert_allclose([r["nearest_distance"] for r in rows], ref.nearest_distance, rtol=1e-5)
    assert not any(r["abstained"] for r in rows)
    assert all(r["class_name"] == str(r["label"]) for r in rows)  # MNIST's class names are the digits


def test_abstain_is_on_by_default_and_noise_is_unknown(mnist_runs, digits, capsys, data_dir):
    folder, _, _ = digits
    rows = _jsonl(capsys, ["classify", str(mnist_runs["dundi"]), str(folder), "--format", "jsonl",
                           "--calibration-limit", "300"])
    noise = rows[-1]
    assert noise["abstained"] and noise["label"] is None and noise["class_name"] == "unknown"
    assert isinstance(noise["nearest_label"], int)  # what it would have answered
    assert sum(r["abstained"] for r in rows[:-1]) <= 1


def test_table_csv_and_parquet_say_the_same(mnist_runs, digits, capsys, tmp_path):
    folder, _, _ = digits
    base = ["classify", str(mnist_runs["dundi"]), str(folder / "d0*.png"), "--abstain-threshold", "none"]
    rows = _jsonl(capsys, base + ["--format", "jsonl"])
    assert main(base) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["file", "label", "class_name"]
    assert len(table) == len(rows) + 2  # header, one line per image, the score legend
    for line, r in zip(table[1:], rows):
        assert line.startswith(r["file"]) and f"{r['nearest_distance']:.4f}" in line
        assert f"{r['topk_classes'][0]}:{r['topk_scores'][0]:.3f}" in line
    assert main(base + ["--format", "csv"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [int(p["label"]) for p in parsed] == [r["label"] for r in rows]
    assert [p["topk_classes"] for p in parsed] == [" ".join(map(str, r["topk_classes"])) for r in rows]
    out = tmp_path / "answers.parquet"
    assert main(base + ["--format", "parquet", "--out", str(out)]) == 0
    assert pq.read_table(out).to_pylist() == rows
    assert not [p for p in tmp_path.iterdir() if p.name != "answers.parquet"]  # no temp file left


def test_native_run_answers_with_softmax_top_k(mnist_runs, digits, capsys):
    import torch

    folder, x, noise = digits
    rows = _jsonl(capsys, ["classify", str(mnist_runs["native"]), str(folder), "--format", "jsonl", "--k", "3"])
    run = Run.load(mnist_runs["native"])
    with torch.no_grad():
        probs = torch.softmax(run.model(torch.from_numpy(np.concatenate([x, noise]))), 1).numpy()
    assert [r["label"] for r in rows] == probs.argmax(1).tolist()
    for r, p in zip(rows, probs):
        assert r["topk_classes"] == np.argsort(-p, kind="stable")[:3].tolist()
        np.testing.assert_allclose(r["topk_scores"], p[r["topk_classes"]], rtol=1e-4, atol=1e-6)
        assert "abstained" not in r and "nearest_distance" not in r


@pytest.mark.parametrize("extra, fragment", [
    (["--limit", "5"], "--limit apply to a dataset split"),
    (["--format", "parquet"], "give --out FILE.parquet"),
    (["--json"], "--json apply to a dataset split"),
])
def test_image_mode_mistakes_are_one_line(mnist_runs, digits, extra, fragment):
    folder, _, _ = digits
    r = subprocess.run(DUNDI + ["classify", str(mnist_runs["dundi"]), str(folder), *extra],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr


def test_wrong_size_and_unreadable_files_are_named(mnist_runs, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(big)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    for path, fragment in ((big, "32x32 pixels; this run takes 28x28"), (bad, "cannot be read")):
        r = subprocess.run(DUNDI + ["classify", str(mnist_runs["dundi"]), str(path), "--abstain-threshold", "none"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert str(path) in r.stderr and fragment in r.stderr
    r = subprocess.run(DUNDI + ["classify", str(mnist_runs["dundi"]), str(big), "--resize",
                                "--abstain-threshold", "none", "--format", "jsonl"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["file"] == str(big)
