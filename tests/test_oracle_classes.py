"""Named, ragged, enrollable classes in the oracle index, against the float64 reference of
Algorithm 1 (dundi.rule.reference.two_step_reference) with per-class counts."""

import json

import numpy as np
import pytest
import torch

from dundi.errors import DundiError
from dundi.rule.index import OracleIndex
from dundi.rule.params import TwoStepRule
from dundi.rule.reference import class_scores, two_step_reference
from rule_helpers import resolved


def ragged(rng, counts, dim, spread=1.0):
    """Class-major oracle rows, a zero-padded (C, n_max, D) tensor for the reference, queries."""
    centres = rng.normal(size=(len(counts), dim))
    rows = [centres[c] + spread * rng.normal(size=(cnt, dim)) for c, cnt in enumerate(counts)]
    padded = np.zeros((len(counts), max(counts), dim))
    for c, r in enumerate(rows):
        padded[c, :len(r)] = r
    which = rng.integers(len(counts), size=120)
    queries = centres[which] + spread * rng.normal(size=(120, dim))
    return (np.concatenate(rows).astype(np.float32), torch.from_numpy(padded.astype(np.float32)),
            queries.astype(np.float32))


def reference(queries, padded, counts, n, m, k, metric="euclidean"):
    rule = resolved(padded, TwoStepRule(n, m, k), metric, counts=counts)
    return two_step_reference(torch.from_numpy(queries), padded, rule, counts=counts).numpy()


# every search path: one matrix; exact step 1; shortlists covering every class (exact step 1)
PATHS = {
    "full": {"full_limit": 10**9},
    "exact-coarse": {"full_limit": 0},
    "ivf": {"full_limit": 0, "exact_coarse_limit": 0, "shortlist_kind": "ivf", "nprobe": 10_000},
    "ivfpq": {"full_limit": 0, "exact_coarse_limit": 0, "shortlist_kind": "ivfpq", "nprobe": 10_000},
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("n,m,k", [(20, 3, 5), (10, 1, 3), (4, 4, 1), (1, 1, 2)])
def test_ragged_classes_equal_the_reference_on_every_path(path, metric, n, m, k):
    rng = np.random.default_rng(n * 7 + m + k)
    counts = [20, 1, 10, 20, 3, 7, 20, 2, 20, 15] * 8  # 80 classes, 1 to 20 oracles
    vectors, padded, queries = ragged(rng, counts, 16)
    kw = dict(PATHS[path], shortlist=len(counts)) if "shortlist_kind" in PATHS[path] else PATHS[path]
    index = OracleIndex(vectors, counts=counts, metric=metric, **kw)
    got = index.classify(queries, TwoStepRule(n, m, k))
    np.testing.assert_array_equal(got.labels, reference(queries, padded, counts, n, m, k, metric))
    assert (got.topk_classes == got.labels[:, None]).any(1).all()


def test_mean_rule_is_the_papers_sum_when_every_class_holds_n():
    """Equal counts: the reported scores are the plain sums (no rescaling) and the labels are
    the paper's; a class holding fewer than n scores n × its mean similarity."""
    rng = np.random.default_rng(1)
    oracles = rng.normal(size=(12, 8, 6)).astype(np.float32)
    q = rng.normal(size=(50, 6)).astype(np.float32)
    index = OracleIndex(oracles.reshape(-1, 6), counts=[8] * 12)
    res = index.classify(q, TwoStepRule(8, 3, 12))
    sums = class_scores(torch.from_numpy(q), torch.from_numpy(oracles)).double().numpy()
    np.testing.assert_allclose(res.fine_scores, np.take_along_axis(sums, res.topk_classes, 1), rtol=1e-6)
    np.testing.assert_array_equal(res.labels, two_step_reference(torch.from_numpy(q), torch.from_numpy(oracles), index.resolve(TwoStepRule(8, 3, 12))).numpy())
    # drop class 0 to 2 oracles: its score becomes 8 × mean over those 2
    short = OracleIndex(np.concatenate([oracles[0, :2], oracles[1:].reshape(-1, 6)]), counts=[2] + [8] * 11)
    res = short.classify(q, TwoStepRule(8, 3, 12))
    mean0 = -np.linalg.norm(q[:, None, :].astype(np.float64) - oracles[0, :2], axis=-1).mean(1)
    got0 = res.fine_scores[res.topk_classes == 0]
    np.testing.assert_allclose(got0, 8 * mean0, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_exact_ties_with_ragged_classes(path):
    """Integer vectors under the squared distance make every score exact. Class 3+c repeats
    class c's oracles twice (twice the count, the same mean): every score ties, and the lower
    label must win in both steps."""
    rng = np.random.default_rng(5)
    base = [rng.integers(-2, 3, size=(cnt, 4)).astype(np.float32) for cnt in (2, 3, 1)]
    rows = base + [np.concatenate([b, b]) for b in base]
    counts = [len(r) for r in rows]
    padded = np.zeros((6, max(counts), 4), np.float32)
    for c, r in enumerate(rows):
        padded[c, :len(r)] = r
    queries = rng.integers(-2, 3, size=(100, 4)).astype(np.float32)
    kw = dict(PATHS[path], shortlist=6) if "shortlist_kind" in PATHS[path] else PATHS[path]
    index = OracleIndex(np.concatenate(rows), counts=counts, metric="sqeuclidean", **kw)
    for n, m, k in [(6, 2, 2), (4, 1, 3), (1, 1, 1), (6, 6, 6)]:
        got = index.classify(queries, TwoStepRule(n, m, k)).labels
        ref = reference(queries, torch.from_numpy(padded), counts, n, m, k, "sqeuclidean")
        np.testing.assert_array_equal(got, ref)
        if n <= 2:  # within the shortest class's count every duplicate ties with its original
            assert (got < 3).all()


def _enrolled_reference_check(index, rows, names, queries, n=20, m=3, k=5):
    counts = [len(r) for r in rows]
    padded = np.zeros((len(rows), max(counts), rows[0].shape[1]), np.float32)
    for c, r in enumerate(rows):
        padded[c, :len(r)] = r
    assert index.class_names == names
    assert index.class_counts().tolist() == counts
    got = index.classify(queries, TwoStepRule(n, m, k)).labels
    np.testing.assert_array_equal(got, reference(queries, torch.from_numpy(padded), counts, n, m, k))
    return got


@pytest.mark.parametrize("path", PATHS)
def test_add_and_remove_classes_equal_the_reference(path):
    rng = np.random.default_rng(7)
    counts = [20] * 300  # enough classes for the 4-bit codes of the ivfpq shortlist
    vectors, _, queries = ragged(rng, counts, 12)
    rows = list(vectors.reshape(300, 20, 12))
    kw = dict(PATHS[path], shortlist=400) if "shortlist_kind" in PATHS[path] else PATHS[path]
    index = OracleIndex(vectors, 300, **kw)
    names = [str(c) for c in range(300)]
    index.classify(queries)  # builds the step-1 structure, which enrolment must extend
    new = {"ann": rng.normal(size=(1, 12)), "bob": rng.normal(size=(10, 12)) + 3, "cy": rng.normal(size=(20, 12))}
    for name, emb in new.items():
        assert index.add_class(name, emb) == len(names)
        rows.append(emb.astype(np.float32))
        names.append(name)
    near_bob = (new["bob"][:5] + 0.01).astype(np.float32)
    got = _enrolled_reference_check(index, rows, names, np.concatenate([queries, near_bob]))
    assert index.names_of(got[-5:]) == ["bob"] * 5  # an enrolled class is recognised at once
    for name in ("5", "ann"):  # renumbering: later classes move down one label
        label = index.label_of(name)
        index.remove_class(name)
        del rows[label], names[label]
        assert index.label_of("bob") == names.index("bob")
    _enrolled_reference_check(index, rows, names, queries)


def test_enrolment_refusals_name_the_fix():
    index = OracleIndex(np.zeros((20, 4), np.float32), 10)
    with pytest.raises(DundiError, match="already in the index"):
        index.add_class("3", np.ones((2, 4)))
    with pytest.raises(DundiError, match=r"takes \(count, 4\)"):
        index.add_class("new", np.ones((2, 5)))
    with pytest.raises(DundiError, match="NaN or Inf"):
        index.add_class("new", np.array([[0, 1, np.nan, 0]]))
    with pytest.raises(DundiError, match="at least one image"):
        index.add_class("new", np.zeros((0, 4)))
    with pytest.raises(DundiError, match="non-empty string"):
        index.add_class("  ", np.ones((1, 4)))
    with pytest.raises(DundiError, match="no class named 'ghost'"):
        index.remove_class("ghost")
    assert index.num_classes == 10 and index.class_counts().sum() == 20  # nothing changed
    single = OracleIndex(np.zeros((3, 4), np.float32), 1, class_names=["only"])
    with pytest.raises(DundiError, match="only class"):
        single.remove_class("only")
    with pytest.raises(DundiError, match="unique"):
        OracleIndex(np.zeros((4, 4), np.float32), 2, class_names=["a", "a"])
    with pytest.raises(DundiError, match="add up"):
        OracleIndex(np.zeros((4, 4), np.float32), counts=[1, 2])
    with pytest.raises(DundiError, match="different numbers"):
        OracleIndex(np.zeros((4, 4), np.float32), counts=[1, 3]).blocks


def test_names_counts_and_answers_survive_save_and_load(tmp_path):
    rng = np.random.default_rng(9)
    counts = [20, 1, 10, 5]
    vectors, _, queries = ragged(rng, counts, 8)
    index = OracleIndex(vectors, counts=counts, class_names=["cat", "dog", "émeu", "fox"], meta={"seed": 3})
    index.add_class("gnu", rng.normal(size=(3, 8)))
    index.remove_class("dog")
    index.save(tmp_path)
    loaded = OracleIndex.load(tmp_path)
    assert loaded.class_names == ["cat", "émeu", "fox", "gnu"]
    assert loaded.class_counts().tolist() == [20, 10, 5, 3] and loaded.meta["seed"] == 3
    a, b = index.classify(queries, TwoStepRule(20, 3, 2)), loaded.classify(queries, TwoStepRule(20, 3, 2))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.fine_scores, b.fine_scores)
    # an index saved before names and counts existed loads as equal blocks named "0".."C-1"
    meta = json.loads((tmp_path / "oracle.json").read_text())
    OracleIndex(vectors[:20], 4).save(tmp_path / "old")
    old = json.loads((tmp_path / "old" / "oracle.json").read_text())
    for key in ("class_names", "counts", "format"):
        old.pop(key)
    (tmp_path / "old" / "oracle.json").write_text(json.dumps(old))
    legacy = OracleIndex.load(tmp_path / "old")
    assert legacy.class_names == ["0", "1", "2", "3"] and legacy.class_counts().tolist() == [5] * 4
    assert meta["format"] == 2


def test_shortlist_path_equals_exact_path_when_it_covers_every_class():
    """The FAISS shortlist structures only pick candidates: given every class, the answers are
    the exact path's (a few queries near their class, at 2,000 classes)."""
    rng = np.random.default_rng(11)
    counts = rng.integers(1, 21, size=2000)
    vectors, _, queries = ragged(rng, counts.tolist(), 16, spread=0.5)
    exact = OracleIndex(vectors, counts=counts, full_limit=0).classify(queries, TwoStepRule(20, 3, 5))
    for kind in ("ivf", "ivfpq"):
        idx = OracleIndex(vectors, counts=counts, full_limit=0, exact_coarse_limit=0,
                          shortlist_kind=kind, shortlist=2000, nprobe=10_000)
        got = idx.classify(queries, TwoStepRule(20, 3, 5))
        np.testing.assert_array_equal(got.labels, exact.labels)
        np.testing.assert_array_equal(got.topk_classes, exact.topk_classes)


@pytest.mark.parametrize("k", [1, 3, 5, 40])
def test_top_k_matches_a_full_stable_sort_with_ties(k):
    from dundi.rule.search import top_k

    rng = np.random.default_rng(k)
    scores = rng.integers(-4, 1, size=(300, 50)).astype(np.float64)  # many ties, at every rank
    scores[::7] = rng.normal(size=(len(scores[::7]), 50))           # and rows without ties
    scores[5, :] = -np.inf                                           # a row of missing hits
    np.testing.assert_array_equal(top_k(scores, k), np.argsort(-scores, axis=1, kind="stable")[:, :k])


def test_an_index_built_from_a_dataset_is_named_after_its_classes():
    from dundi.data import DATASETS
    from dundi.run.storage import dataset_class_names

    names = list(DATASETS["fashion-mnist"].class_names)
    assert list(dataset_class_names({"dataset": "fashion-mnist", "num_classes": 10})) == names
    kept = [0, 2, 3, 5, 6, 7, 8, 9]  # a run trained with two held-out classes
    assert list(dataset_class_names({"dataset": "fashion-mnist", "num_classes": 8, "dataset_classes": kept})) == \
        [names[c] for c in kept]
    assert list(dataset_class_names({"dataset": "synthetic", "num_classes": 3})) == ["0", "1", "2"]


def test_enrolled_index_in_a_run_keeps_its_hash_check(tmp_path):
    """An index with enrolled classes saved into a run loads through the run's sha256
    verification, names and counts intact; a renamed class in its metadata is refused."""
    from dundi.nets.models import build_distance_net
    from dundi.run.storage import load_oracle, save_model, save_oracle

    model = build_distance_net("lenet5", (1, 28, 28), 16)
    save_model(tmp_path, model, {"kind": "dundi", "arch": "lenet5", "dataset": "mnist-10k",
                                 "in_shape": [1, 28, 28], "num_classes": 10, "embed_dim": 16,
                                 "mode": "R", "config": {}})
    rng = np.random.default_rng(2)
    index = OracleIndex(rng.normal(size=(40, 16)).astype(np.float32), 10)
    index.add_class("eleven", rng.normal(size=(2, 16)))
    index.remove_class("3")
    save_oracle(tmp_path, index)
    loaded = load_oracle(tmp_path)
    assert loaded.class_names == index.class_names and loaded.class_counts().tolist() == [4] * 9 + [2]
    run_meta = json.loads((tmp_path / "run.json").read_text())
    (meta_name,) = [f for f in run_meta["files"] if f.endswith("oracle.json")]  # the live version's
    meta_path = tmp_path / meta_name
    meta_path.write_text(meta_path.read_text().replace('"eleven"', '"twelve"'))
    with pytest.raises(DundiError, match="oracle.json does not match the sha256"):
        load_oracle(tmp_path)


def test_a_copy_changes_without_touching_the_original():
    rng = np.random.default_rng(4)
    vectors, _, queries = ragged(rng, [5] * 12, 8)
    index = OracleIndex(vectors, 12, metric="sqeuclidean", meta={"seed": 1, "ids": [1, 2]})
    before = index.classify(queries, TwoStepRule(5, 2, 3))
    twin = index.copy()
    twin.add_class("new", queries[:3])
    twin.remove_class("0")
    twin.meta["ids"].append(3)
    assert index.class_names == [str(c) for c in range(12)] and index.meta["ids"] == [1, 2]
    assert twin.class_names == [str(c) for c in range(1, 12)] + ["new"] and twin.metric == "sqeuclidean"
    after = index.classify(queries, TwoStepRule(5, 2, 3))
    np.testing.assert_array_equal(before.labels, after.labels)
    np.testing.assert_array_equal(before.fine_scores, after.fine_scores)
