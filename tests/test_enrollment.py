"""Enrolling and removing classes (dundi.run.enrollment, `dundi index add|remove|list`): the
oracles stored are the model's embeddings of the images the seeded rule picks, a round trip
restores the index, every change is a new index version committed atomically, refusals are
one line, and class names reach every answer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dundi.cli.main import main
from dundi.errors import DundiError
from dundi.nets.models import build_distance_net
from dundi.rule.index import OracleIndex
from dundi.rule.params import TwoStepRule
from dundi.data.pixels import validate_images
from dundi.run.directory import Run
from dundi.run.storage import index_versions, read_meta, save_model, save_oracle
from dundi.run.enrollment import add_class, list_classes, remove_class

SHAPE = (1, 28, 28)
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Sandal"]   # fashion-mnist classes 0, 1, 2, 5


def _run(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A 4-class fashion-mnist run trained without classes 3, 4, 6..9 (random weights: the
    invariants below do not depend on training), with an index of 5 oracles per class."""
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = build_distance_net("lenet5", SHAPE, 16).eval()
    meta = {"kind": "dundi", "arch": "lenet5", "dataset": "fashion-mnist", "in_shape": list(SHAPE),
            "num_classes": 4, "dataset_classes": [0, 1, 2, 5], "embed_dim": 16, "mode": "R", "config": {}}
    save_model(run, model, meta)
    x = torch.rand(20, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb = model(x).numpy()
    save_oracle(run, OracleIndex(emb, 4, class_names=NAMES, meta={"dataset_classes": [0, 1, 2, 5]}))
    return run, model


def _images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((count, *SHAPE), dtype=np.float32)


def _embed(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def _write_pngs(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"{i:03d}.png"
        Image.fromarray(np.rint(img[0] * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_enrolled_oracles_are_the_embeddings_of_the_seeded_pick(tmp_path):
    run_dir, model = _run(tmp_path)
    images = _images(12, seed=2)
    out = add_class(run_dir, "boot", images, n=5, seed=7)
    assert out["added"] == {"class": "boot", "images": 12, "oracles": 5}
    # reference: the rule `index build` applies to one class, written out independently
    pick = np.random.default_rng(7).choice(np.arange(12), 5, replace=False)
    run = Run.load(run_dir)
    assert run.class_names == (*NAMES, "boot")
    assert run.oracle.class_counts().tolist() == [5, 5, 5, 5, 5]
    np.testing.assert_allclose(run.oracle.class_oracles(4), _embed(model, images[pick]), atol=1e-5)
    # an enrolled image is its own class's first oracle: with n = m = 1 it is answered as it
    answer = run.classify(images[pick[:1]], TwoStepRule(1, 1, 5))
    assert run.class_names[answer.labels[0]] == "boot" and answer.nearest_distance[0] < 1e-3


def test_fewer_images_than_oracles_keeps_them_all(tmp_path):
    run_dir, model = _run(tmp_path)
    images = _images(2, seed=3)
    add_class(run_dir, "rare", images)  # default n: the fullest class's 5
    run = Run.load(run_dir)
    assert run.oracle.class_counts().tolist() == [5, 5, 5, 5, 2]
    pick = np.random.default_rng(0).choice(np.arange(2), 2, replace=False)
    np.testing.assert_allclose(run.oracle.class_oracles(4), _embed(model, images[pick]), atol=1e-5)


def test_add_remove_list_round_trip_through_the_cli(tmp_path, capsys):
    run_dir, _ = _run(tmp_path)
    before = Run.load(run_dir)
    queries = _images(30, seed=4)
    answers_before = before.classify(queries, TwoStepRule(5, 3, 3))
    files = _write_pngs(tmp_path / "imgs" / "bag", (np.rint(_images(6, seed=5) * 255) / 255).astype(np.float32))

    assert main(["index", "add", str(run_dir), "--class", "bag", "--images", str(files[0].parent),
                 "--oracles", "4", "--json"]) == 0
    added = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (added["label"], added["oracles"], added["images"], added["version"], added["classes"]) == (4, 4, 6, 2, 5)
    assert main(["index", "list", str(run_dir), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in listing["classes"]] == [*NAMES, "bag"]
    assert [c["oracles"] for c in listing["classes"]] == [5, 5, 5, 5, 4]
    assert [c["dataset_class"] for c in listing["classes"]] == [0, 1, 2, 5, -1]
    assert (listing["version"], listing["versions"]) == (2, [1, 2])

    assert main(["index", "remove", str(run_dir), "--class", "Trouser", "--json"]) == 0
    capsys.readouterr()
    after = Run.load(run_dir)
    assert after.class_names == ("T-shirt/top", "Pullover", "Sandal", "bag")
    assert main(["index", "remove", str(run_dir), "--class", "bag"]) == 0
    main(["index", "add", str(run_dir), "--class", "Trouser", "--images", *map(str, files)])
    # every version is kept and verifiable; version 1 is the index as built
    meta = read_meta(run_dir)
    assert index_versions(meta) == [1, 2, 3, 4, 5] and meta["oracle"]["version"] == 5
    first = Run.load(run_dir, index_version=1)
    np.testing.assert_array_equal(first.oracle.vectors, before.oracle.vectors)
    again = first.classify(queries, TwoStepRule(5, 3, 3))
    np.testing.assert_array_equal(again.labels, answers_before.labels)
    # removing a class and its images gives the old index back for the others
    remove_class(run_dir, "Trouser")
    removed = Run.load(run_dir)
    np.testing.assert_array_equal(removed.oracle.vectors, before.oracle.vectors[np.r_[0:5, 10:20]])
    assert removed.oracle.meta["dataset_classes"] == [0, 2, 5]


def test_dataset_classes_follow_labels_so_split_accuracy_counts_enrolled_classes(tmp_path):
    """run_rows maps dataset labels to the live index's labels: an enrolled dataset class is
    counted under its new label, a class enrolled from other images matches no row."""
    from dundi.run.pipeline import run_rows

    run_dir, _ = _run(tmp_path)
    add_class(run_dir, "Coat", _images(3, seed=6), dataset_class=4)
    add_class(run_dir, "mine", _images(3, seed=7))
    remove_class(run_dir, "Trouser")
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 4, 9])
    images = np.zeros((len(labels), 1), np.float32)
    _, got, ids = run_rows(read_meta(run_dir), images, labels, np.arange(len(labels)))
    # index after the changes: T-shirt/top(0) Pullover(2) Sandal(5) Coat(4) mine(-1)
    assert ids.tolist() == [0, 2, 4, 5, 7] and got.tolist() == [0, 1, 3, 2, 3]
    _, trained, _ = run_rows(read_meta(run_dir), images, labels, np.arange(len(labels)), trained=True)
    assert trained.tolist() == [0, 1, 2, 3]  # `index build` still picks from the trained classes


def test_the_adaptive_stand_in_follows_the_rule_on_enrolled_classes(tmp_path):
    """With classes of 1, 5 and 10 oracles and n = 10, m = 3 (counts that divide n, or one
    oracle), the differentiable stand-in's argmax (the adaptive threat model) equals the FAISS
    rule and the float64 reference of Algorithm 1 on every query."""
    from dundi.rule.reference import TwoStepScorer, two_step_reference

    rng = np.random.default_rng(0)
    counts = [5, 10, 1, 5, 10, 1]
    index = OracleIndex(rng.normal(size=(sum(counts), 8)).astype(np.float32), counts=counts)
    run = Run(tmp_path, torch.nn.Identity(), {}, index)
    emb = np.concatenate([index.vectors + 0.1 * rng.normal(size=index.vectors.shape),
                          rng.normal(size=(300, 8))]).astype(np.float32)
    expected = index.classify(emb, TwoStepRule(10, 3, 3)).labels
    tensor = run.oracle_tensor(10)
    rule = index.resolve(TwoStepRule(10, 3, 3))
    reference = two_step_reference(torch.from_numpy(emb), tensor, rule, counts=counts).numpy()
    with torch.no_grad():
        got = TwoStepScorer(torch.nn.Identity(), tensor, rule, counts=counts)(torch.from_numpy(emb)).argmax(1).numpy()
    assert set(expected.tolist()) == set(range(6))
    np.testing.assert_array_equal(reference, expected)
    np.testing.assert_array_equal(got, expected)
    squared = Run(tmp_path, torch.nn.Identity(), {}, OracleIndex(index.vectors, counts=counts, metric="sqeuclidean"))
    with pytest.raises(DundiError, match="certificates need every class"):
        squared.certifier(TwoStepRule(10, 3, 3))  # a certificate must be exact: no stand-in for a class


# ---------------------------------------------------------------------------- atomic versions

def test_a_write_killed_before_its_commit_leaves_the_previous_version(tmp_path, monkeypatch):
    import dundi.run.storage as storage

    run_dir, _ = _run(tmp_path)
    before = Run.load(run_dir)

    def killed(path, obj):  # the process dies where run.json would be replaced
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(storage, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        add_class(run_dir, "boot", _images(4, seed=8))
    monkeypatch.undo()
    assert (run_dir / "oracle" / "v2" / "index.faiss").exists()  # written, never committed
    # leftovers of other killed writers: a staging directory and a temporary run.json
    staging = run_dir / "oracle" / ".v2.tmp99999"
    staging.mkdir()
    (staging / "index.faiss").write_bytes(b"half a file")
    (run_dir / "run.json.tmp99999").write_text("{\"truncated")
    after = Run.load(run_dir)
    assert after.class_names == before.class_names and read_meta(run_dir)["oracle"]["version"] == 1
    np.testing.assert_array_equal(after.oracle.vectors, before.oracle.vectors)
    # the next change overwrites the uncommitted version and commits it
    add_class(run_dir, "boot", _images(4, seed=8))
    assert Run.load(run_dir).class_names == (*NAMES, "boot")
    assert read_meta(run_dir)["oracle"]["version"] == 2


def test_a_tampered_version_is_refused_and_older_ones_still_load(tmp_path):
    run_dir, _ = _run(tmp_path)
    add_class(run_dir, "boot", _images(4, seed=8))
    with open(run_dir / "oracle" / "v2" / "oracle.json", "a") as f:
        f.write(" ")
    with pytest.raises(DundiError, match="oracle/v2/oracle.json does not match the sha256"):
        Run.load(run_dir)
    assert Run.load(run_dir, index_version=1).class_names == tuple(NAMES)
    with pytest.raises(DundiError, match="no index version 7"):
        Run.load(run_dir, index_version=7)


def test_runs_written_before_versions_load_as_version_0(tmp_path):
    """A run whose index sits in oracle/ itself (the layout before versions) still loads,
    and its first change is written as version 1 beside it."""
    run_dir, _ = _run(tmp_path)
    meta = read_meta(run_dir)
    for name in ("index.faiss", "oracle.json"):
        os.replace(run_dir / "oracle" / "v1" / name, run_dir / "oracle" / name)
        meta["files"][f"oracle/{name}"] = meta["files"].pop(f"oracle/v1/{name}")
    del meta["oracle"]["version"]
    (run_dir / "run.json").write_text(json.dumps(meta))
    assert list_classes(run_dir)["version"] == 0
    add_class(run_dir, "boot", _images(3, seed=9))
    assert list_classes(run_dir)["versions"] == [0, 1]
    assert Run.load(run_dir, index_version=0).class_names == tuple(NAMES)


# ---------------------------------------------------------------------------- refusals

def _one_line_exit_2(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err


def test_refusals_are_one_line_and_change_nothing(tmp_path, capsys):
    run_dir, _ = _run(tmp_path)
    good = _write_pngs(tmp_path / "good", _images(3, seed=10))
    (tmp_path / "empty").mkdir()
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(big)
    run = str(run_dir)
    cases = [
        (["index", "add", str(tmp_path / "nope"), "--class", "x", "--images", str(good[0])], "is not a DunDi run"),
        (["index", "add", run, "--class", "Trouser", "--images", str(good[0])], "already in"),
        (["index", "add", run, "--class", "x", "--images", str(tmp_path / "empty")], "holds no PNG or JPEG"),
        (["index", "add", run, "--class", "x", "--images", str(big)], "is 32x32 pixels"),
        (["index", "add", run, "--class", "x", "--images", str(tmp_path / "missing.png")], "no such file"),
        (["index", "add", run, "--class", "x"], "either as --images"),
        (["index", "add", run, "--class", "x", "--images", str(good[0]), "--label", "3"], "not both"),
        (["index", "add", run, "--class", " x", "--images", str(good[0])], "not accepted"),
        (["index", "add", run, "--class", "", "--images", str(good[0])], "empty"),
        (["index", "add", run, "--class", "x", "--label", "12"], "not a class of fashion-mnist"),
        (["index", "add", run, "--class", "x", "--label", "0"], "already class 'T-shirt/top'"),
        (["index", "remove", run, "--class", "nope"], "has no class 'nope'"),
        (["index", "list", str(tmp_path / "nope")], "is not a DunDi run"),
    ]
    for argv, needle in cases:
        _one_line_exit_2(capsys, argv, needle)
    for name in NAMES[1:]:
        remove_class(run_dir, name, min_classes=1)
    _one_line_exit_2(capsys, ["index", "remove", run, "--class", NAMES[0]], "at least")
    assert read_meta(run_dir)["oracle"]["version"] == 4  # only the three removals were written


def test_a_native_run_has_no_classes_to_enroll(tmp_path, capsys):
    from dundi.nets.models import build_native

    save_model(tmp_path, build_native("lenet1", SHAPE, 10),
               {"kind": "native", "arch": "lenet1", "dataset": "mnist-10k", "in_shape": list(SHAPE), "num_classes": 10})
    png = _write_pngs(tmp_path / "imgs", _images(1, seed=11))[0]
    _one_line_exit_2(capsys, ["index", "add", str(tmp_path), "--class", "x", "--images", str(png)], "native run")


def test_images_are_checked_as_classify_checks_them(tmp_path):
    run_dir, _ = _run(tmp_path)
    with pytest.raises(DundiError, match="divide by 255"):
        add_class(run_dir, "x", _images(2, seed=12) * 255)
    with pytest.raises(DundiError, match="no images"):
        add_class(run_dir, "x", np.zeros((0, *SHAPE), np.float32))
    assert validate_images(_images(1, seed=1), SHAPE).shape == (1, *SHAPE)


# ---------------------------------------------------------------------------- names in answers

def test_names_reach_every_answer(tmp_path, capsys):
    from fastapi.testclient import TestClient

    from dundi.serving.app import LocalBackend, create_app
    from dundi.serving.model import ModelConfig
    from dundi.serving.settings import ServeSettings, hash_token

    run_dir, _ = _run(tmp_path)
    images = (np.rint(_images(3, seed=13) * 255) / 255).astype(np.float32)  # exact as 8-bit PNGs
    add_class(run_dir, "Ankle boot", images, dataset_class=9)
    pick = np.random.default_rng(0).choice(np.arange(3), 3, replace=False)
    first = images[pick[:1]]
    # the CLI's answers for image files
    png = _write_pngs(tmp_path / "q", first)[0]
    assert main(["classify", str(run_dir), str(png), "--n", "1", "--m", "1", "--k", "5",
                 "--abstain-threshold", "none", "--format", "jsonl"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert row["class_name"] == "Ankle boot"
    # HTTP: /classify and v2 name the enrolled class; metadata lists the names and version
    backend = LocalBackend(ModelConfig(str(run_dir), n=1, m=1, k=5))
    client = TestClient(create_app(backend, ServeSettings(admin_token_sha256=hash_token("t"))))
    res = client.post("/classify", json={"images": np.rint(png_pixels(png) * 255).astype(int).tolist(),
                                         "dtype": "uint8"})
    assert res.status_code == 200, res.text
    assert res.json()["results"][0]["class_name"] == "Ankle boot"
    v2 = client.post("/v2/models/dundi/infer", json={"inputs": [{"name": "images", "shape": [1, 28, 28],
                     "datatype": "UINT8", "data": np.rint(png_pixels(png) * 255).astype(int).ravel().tolist()}]})
    outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
    assert outputs["class_name"] == ["Ankle boot"]
    meta = client.get("/v2/models/dundi").json()["parameters"]
    assert meta["class_names"] == [*NAMES, "Ankle boot"] and meta["index_version"] == 2


def png_pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), np.float32)[None, None] / 255.0
