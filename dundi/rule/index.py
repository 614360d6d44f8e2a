"""The oracle database as a FAISS-backed index, and Algorithm 1 (two-step classification) over it.

The index is the public face; its parts are free-standing: the class-major rows and
enrolment's appends (:mod:`dundi.rule.oracle_rows`), the two steps' arithmetic
(:mod:`dundi.rule.two_step`), FAISS structures (:mod:`dundi.rule.search`), files on disk
(:mod:`dundi.rule.index_io`) and the float64 rule the certificate proves
(:mod:`dundi.rule.exact`). What stays here: class names and labels, the rule's resolution (the one place a request
becomes a :class:`~dundi.rule.params.ResolvedRule`),
the choice of search path and the caches of step-1 structures.

**Classes.** The index holds named classes (``class_names``, by default ``"0"``..``"C-1"``, or
the dataset's names when built from a dataset), each with its own number of oracles
(``class_counts()``): a class enrolled later from a handful of images may hold 1 or 10 oracles
while the others hold 20. Oracles are stored class-major in one array: class ``c`` owns rows
``offsets[c]`` to ``offsets[c+1]`` in the order given, so its first ``m`` are its coarse oracles
and a class's rows are one contiguous block (read directly, never through FAISS ID selectors,
which GPU indexes silently ignore).

**Labels** are positions in ``class_names`` of the index that answered. ``add_class`` appends
(every existing label keeps its number); ``remove_class`` renumbers the classes after the
removed one down by one. Labels stay a dense range [0, C) because every consumer expects one
(accuracy against dataset labels, ``k <= C``, the (C, n, D) tensors of the differentiable
scorers); stable ids with holes would make all of them special-case removed classes. The
label-to-name mapping is unambiguous as long as names are read from the same index that
answered (:meth:`OracleIndex.names_of`); a service changes a copy and swaps it in whole.

**Scores.** Similarity is the negative distance (``metric``: ``euclidean``, the paper's, or
``sqeuclidean``, under which the rule can be certified: docs/certification.md). Algorithm 1
sums a class's similarities over its n (step 2) or m (step 1) oracles. A class holding fewer
oracles than that uses all it has, ``min(n, count)``, and is compared by its MEAN similarity;
every score is reported as that mean times n (resp. m). So when every class holds at least n
oracles the score is exactly the paper's sum (no rescaling happens at all) and the ranking is
the paper's; a class with fewer oracles is neither penalised for missing terms (a sum would
make it lose) nor favoured. Ties break towards the lower class index in step 1 and towards
the better step-1 rank in step 2.

**Search paths**, by size. With at most ``full_limit`` oracles in all, one exact FAISS distance
matrix serves both steps. Otherwise step 1 is exact over every class's coarse oracles while
they number at most ``exact_coarse_limit``; beyond that a FAISS structure over each class's
coarse centroid (the mean of its first min(m, count) oracles; :class:`dundi.rule.search.
Shortlister`) shortlists candidate classes whose coarse scores are then computed exactly.
Step 2 reads the kept classes' rows and scores them exactly.

An index is not safe to change (add/remove) while another thread classifies with it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from dundi.errors import DundiError
from dundi.rule.exact import ExactRule
from dundi.rule.index_io import INDEX_FILE, META_FILE, read_oracles, write_oracles
from dundi.rule.oracle_rows import OracleRows, checked_embeddings, split_counts
from dundi.rule.distance import Distance, distance_named
from dundi.rule.params import DEFAULT_METRIC, ResolvedRule, TwoStepResult, TwoStepRule, _resolve
from dundi.rule.search import SHORTLIST_KINDS, Shortlister, use_gpu
from dundi.rule.two_step import answer, coarse_structure, full_step, listed_step

SHORTLISTS = ("auto", *SHORTLIST_KINDS)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise DundiError(f"class name {name!r} must be a non-empty string")
    return name


class OracleIndex:
    """Named classes, each with its own oracle embeddings, and Algorithm 1 over them.

    ``OracleIndex(vectors, C)`` splits ``vectors`` into C equal class blocks; pass ``counts``
    (oracles per class, class-major) for classes of different sizes.
    """

    CHUNK = 512  # queries per step: bounds the (chunk, k, n, D) fine-step buffer

    def __init__(self, vectors: np.ndarray, num_classes: int | None = None, *,
                 counts: np.ndarray | list[int] | None = None, class_names: list[str] | None = None,
                 full_limit: int = 4096, exact_coarse_limit: int = 65536,
                 shortlist: int | None = None, nprobe: int | None = None,
                 shortlist_kind: str = "auto", meta: dict | None = None, metric: str = DEFAULT_METRIC):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._rows = OracleRows(vectors, split_counts(vectors, num_classes, counts))
        self.dim = self._rows.dim
        names = [str(c) for c in range(self.num_classes)] if class_names is None else list(class_names)
        self._set_names(names)
        if shortlist_kind not in SHORTLISTS:
            raise DundiError(f"unknown shortlist kind {shortlist_kind!r}: choose one of {', '.join(SHORTLISTS)}")
        self.full_limit, self.exact_coarse_limit = full_limit, exact_coarse_limit
        self.shortlist, self.nprobe, self.shortlist_kind = shortlist, nprobe, shortlist_kind
        self.distance: Distance = distance_named(metric)  # the metric's name is turned into one, here
        self.meta = {**(meta or {}), "metric": metric}
        self._coarse: dict[int, object] = {}
        self._exact: dict[ResolvedRule, ExactRule] = {}

    def _set_names(self, names: list[str]) -> None:
        for name in names:
            _check_name(name)
        if len(names) != self.num_classes:
            raise DundiError(f"{len(names)} class names for {self.num_classes} classes")
        positions = {name: i for i, name in enumerate(names)}
        if len(positions) != len(names):
            dup = sorted({x for x in names if names.count(x) > 1})
            raise DundiError(f"class names must be unique; repeated: {', '.join(dup[:5])}")
        self._names, self._positions = names, positions

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, labels: np.ndarray, num_classes: int,
                        **kw) -> "OracleIndex":
        """Arrange labelled embeddings into class-major blocks, keeping each class's given
        order (its first m are the coarse oracles). Classes may hold different numbers."""
        labels = np.asarray(labels)
        counts = np.bincount(labels, minlength=num_classes)
        if len(counts) != num_classes or counts.min() == 0:
            raise DundiError(f"oracle labels must cover every class 0..{num_classes - 1} with at "
                             f"least one oracle (and nothing else); got counts {counts.tolist()[:20]}")
        order = np.argsort(labels, kind="stable")
        return cls(np.asarray(embeddings)[order], counts=counts, **kw)

    @property
    def metric(self) -> str:
        """The distance's name, for the edges (run.json, reports, HTTP)."""
        return self.distance.name

    # ---- the classes -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self._rows.counts)

    @property
    def n(self) -> int:
        """The most oracles any class holds: the largest n the fine step can use."""
        return int(self._rows.counts.max())

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (a copy)."""
        return list(self._names)

    def class_counts(self) -> np.ndarray:
        """Oracles held per class, in label order (a copy)."""
        return self._rows.counts.copy()

    @property
    def vectors(self) -> np.ndarray:
        """All oracle embeddings (N, D), class-major (a view; do not modify)."""
        return self._rows.vectors

    def label_of(self, name: str) -> int:
        """The label (position) of a class name."""
        if name not in self._positions:
            raise DundiError(f"no class named {name!r} in this index; it holds "
                             f"{self._names_hint()}")
        return self._positions[name]

    def names_of(self, labels: np.ndarray) -> list[str]:
        """Class names of labels answered by this index."""
        return [self._names[int(i)] for i in np.asarray(labels).ravel()]

    def class_oracles(self, label: int) -> np.ndarray:
        """The oracle embeddings (count, D) of one class (a view)."""
        return self._rows.class_block(label)

    @property
    def blocks(self) -> np.ndarray:
        """Oracles as (C, n, D) when every class holds the same number (a view)."""
        if not self._rows.uniform:
            raise DundiError(f"this index's classes hold different numbers of oracles "
                             f"({int(self._rows.counts.min())} to {self.n}); per-class tensors need "
                             f"equal counts: use class_oracles(label) or padded(n)")
        return self.vectors.reshape(self.num_classes, self.n, self.dim)

    def padded(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The oracle set as the torch consumers read it: (C, n, D) oracles and a (C, n) mask of
        the real ones -- each class's first min(n, count) oracles, the rest filled with copies
        of its last (mask False). With the counts (:meth:`class_counts`) a scorer gives a class
        holding fewer than n the rule's mean × n exactly."""
        n = self.n if n is None else n
        rows, mask, _ = self._rows.rows(np.arange(self.num_classes), n)
        return np.ascontiguousarray(self._rows.buffer[rows]), mask

    def _names_hint(self) -> str:
        shown = ", ".join(self._names[:8]) + (", ..." if len(self._names) > 8 else "")
        return f"{self.num_classes} classes ({shown}); `dundi index list RUN` lists them"

    def copy(self) -> "OracleIndex":
        """An independent copy (oracles, names, settings; step-1 structures are rebuilt on
        first use), so a service can enrol or remove classes on it while the original keeps
        answering, then swap it in whole."""
        return OracleIndex(self.vectors.copy(), counts=self.class_counts(), class_names=self.class_names,
                           full_limit=self.full_limit, exact_coarse_limit=self.exact_coarse_limit,
                           shortlist=self.shortlist, nprobe=self.nprobe, shortlist_kind=self.shortlist_kind,
                           meta=json.loads(json.dumps(self.meta)), metric=self.distance.name)

    # ---- enrolment ---------------------------------------------------------------------
    def add_class(self, name: str, embeddings: np.ndarray) -> int:
        """Enrol a new class from its oracle embeddings (count, D), in the order given (the
        first m are its coarse oracles). Returns its label, the last one. Existing labels are
        unchanged; shortlist structures already built are extended in place."""
        name = _check_name(name)
        if name in self._positions:
            raise DundiError(f"class {name!r} is already in the index (label {self._positions[name]}); "
                             f"remove it first or choose another name")
        self._rows.append_class(checked_embeddings(name, embeddings, self.dim))
        self._names.append(name)
        self._positions[name] = len(self._names) - 1
        self._exact.clear()
        for m, cached in list(self._coarse.items()):
            if isinstance(cached, Shortlister):
                cached.add(self._rows.centroids(m, np.array([self.num_classes - 1])))
            else:
                del self._coarse[m]
        return self.num_classes - 1

    def remove_class(self, name: str) -> None:
        """Remove a class and its oracles; the classes after it move down one label.

        Costs a copy of the oracle array, and step 1's FAISS structure (class ids are labels)
        is rebuilt on the next query: seconds at 100,000 classes, minutes at 1,000,000."""
        label = self.label_of(name)
        if self.num_classes == 1:
            raise DundiError(f"class {name!r} is the only class in the index; an index needs at "
                             f"least one: add another class before removing this one")
        self._rows.remove_class(label)
        self._set_names(self._names[:label] + self._names[label + 1:])
        self._coarse.clear()  # rebuilt on the next query: ids are labels, and labels moved
        self._exact.clear()

    # ---- the two steps (dundi.rule.two_step) ------------------------------------------------
    def _kind(self) -> str:
        if self.shortlist_kind != "auto":
            return self.shortlist_kind
        return "ivf" if use_gpu() else "ivfpq"

    def _coarse_structure(self, m: int):
        """Step 1's structure for m (:func:`dundi.rule.two_step.coarse_structure`), built once."""
        if m not in self._coarse:
            self._coarse[m] = coarse_structure(self._rows, m, self.exact_coarse_limit, self._kind(), self.nprobe)
        return self._coarse[m]

    def resolve(self, rule: TwoStepRule | ResolvedRule | None = None) -> ResolvedRule:
        """The :class:`ResolvedRule` this index answers a request with -- n every oracle a class
        holds and m min(3, n) where the request leaves them open, the index's distance --
        refused if the index cannot honour it. The one place a rule is resolved: entry points
        ask once and pass the result along (a rule already resolved is only :meth:`checked`)."""
        if isinstance(rule, ResolvedRule):
            return self.checked(rule)
        return self.checked(_resolve(rule or TwoStepRule(), self.n, self.distance))

    def checked(self, rule: ResolvedRule) -> ResolvedRule:
        """``rule`` if this index can answer it -- its distance, n no more than a class holds,
        k no more than the classes (classes may have been removed since it was resolved) --
        else one line saying why."""
        if rule.distance is not self.distance:
            raise DundiError(f"the rule ranks by {rule.metric} distance but the index by {self.metric}: "
                             f"resolve the request on this index")
        if rule.n > self.n:
            raise DundiError(f"n={rule.n} is out of range: this index holds at most {self.n} oracles "
                             f"per class; use n <= {self.n}, or rebuild the index with more "
                             f"(`dundi index build RUN --oracles {rule.n}`)")
        if rule.k > self.num_classes:
            raise DundiError(f"k={rule.k} must be between 1 and the number of classes ({self.num_classes})")
        return rule

    def classify(self, queries: np.ndarray, rule: TwoStepRule | ResolvedRule | None = None) -> TwoStepResult:
        """Algorithm 1 for a batch of query embeddings (B, D) under ``rule`` (see :meth:`resolve`)."""
        rule = self.resolve(rule)
        n, m, k = rule.n, rule.m, rule.k
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DundiError(f"queries must have shape (batch, {self.dim}); got {q.shape}")
        if len(q) == 0:
            empty = np.zeros((0, k))
            return TwoStepResult(np.zeros(0, np.int64), empty.astype(np.int64), empty, empty, np.zeros(0))
        if self.answers_exactly(rule):
            return self.exact_rule(rule).classify(q)
        parts = [self._classify_chunk(q[i:i + self.CHUNK], n, m, k)
                 for i in range(0, len(q), self.CHUNK)]
        if len(parts) == 1:
            return parts[0]
        fields = [f.name for f in dataclasses.fields(TwoStepResult)]
        return TwoStepResult(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))

    def _classify_chunk(self, q: np.ndarray, n: int, m: int, k: int) -> TwoStepResult:
        if self._rows.size <= self.full_limit:
            steps = full_step(q, self._rows, n, m, k, self.distance)
        else:
            steps = listed_step(q, self._rows, self._coarse_structure(m), n, m, k, self.distance, self.shortlist)
        return answer(*steps, self.distance)

    def answers_exactly(self, rule: ResolvedRule) -> bool:
        """Whether this index answers ``rule`` through :class:`dundi.rule.exact.ExactRule`: its
        distance is certifiable (squared Euclidean) and every class holds at least n oracles --
        exactly the indexes whose answers can be certified. Step 1 is then exact over every
        class at any size, never a shortlist."""
        return self.distance.certifiable and int(self._rows.counts.min()) >= rule.n

    def step1_kind(self, rule: ResolvedRule) -> str:
        """How step 1 is answered under ``rule``: "exact (float64)" for indexes answering
        exactly, else "exact (FAISS float32)" or "shortlist (FAISS IVF over class centroids)"."""
        if self.answers_exactly(rule):
            return "exact (float64)"
        coarse = int(np.minimum(self._rows.counts, rule.m).sum())
        if self._rows.size <= self.full_limit or coarse <= self.exact_coarse_limit:
            return "exact (FAISS float32)"
        return "shortlist (FAISS IVF over class centroids)"

    def exact_rule(self, rule: ResolvedRule) -> ExactRule:
        """The float64 rule over each class's first n oracles, built once per rule: what this
        index answers with and what the certificate proves (one arithmetic)."""
        if not self.answers_exactly(self.checked(rule)):
            raise DundiError(f"the exact rule needs the squared Euclidean metric and at least n={rule.n} "
                             f"oracles in every class; this index ranks by {self.metric} distance and "
                             f"its classes hold {int(self._rows.counts.min())} to {self.n}")
        if rule not in self._exact:
            self._exact[rule] = ExactRule(self._rows.first_n(rule.n), rule)
        return self._exact[rule]

    @staticmethod
    def select(labels: np.ndarray, n: int, seed: int, num_classes: int) -> np.ndarray:
        """Indices of n random samples per class (seeded), class-major: the oracle database."""
        rng = np.random.default_rng(seed)
        picks = []
        for c in range(num_classes):
            members = np.flatnonzero(np.asarray(labels) == c)
            if len(members) < n:
                raise DundiError(f"class {c} has {len(members)} samples, fewer than n={n} oracles")
            picks.append(rng.choice(members, n, replace=False))
        return np.concatenate(picks).astype(np.int64)

    # ---- persistence (dundi.rule.index_io) --------------------------------------------------
    def save(self, directory: str | os.PathLike, index_file: str = INDEX_FILE,
             meta_file: str = META_FILE) -> dict[str, str]:
        """Write this index to ``directory`` (:func:`dundi.rule.index_io.write_oracles`)."""
        return write_oracles(directory, self.vectors, self._rows.counts, self.class_names, self.meta,
                             index_file, meta_file)

    @classmethod
    def load(cls, directory: str | os.PathLike, index_file: str = INDEX_FILE,
             meta_file: str = META_FILE, **kw) -> "OracleIndex":
        """Read an index written by :meth:`save` (:func:`dundi.rule.index_io.read_oracles`)."""
        vectors, counts, names, meta = read_oracles(directory, index_file, meta_file)
        return cls(vectors, counts=counts, class_names=names, meta=meta,
                   metric=meta.get("metric", DEFAULT_METRIC), **kw)
