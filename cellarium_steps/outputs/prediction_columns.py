"""Per-cell columns derived from a model's prediction, described by plain data (a checkpoint's recipe).

A trained step stores, in its recipe's ``data.prediction``, a list of column specs under
``"columns"``; :class:`~cellarium_steps.outputs.embeddings.ParquetEmbeddingWriter` builds each one
from the prediction dict of every batch, so the ``predict`` step needs to know nothing about the
model. A spec is ``{"kind": ..., "key": <prediction key>, ...}``; the kinds:

``"ontology_call"``
    From a (cells x classes) matrix of *propagated* probabilities (a term's probability covers its
    descendants, so it is never below a descendant's): the most specific term whose probability is
    at least ``threshold`` (default 0.5), i.e. a term at or above ``threshold`` none of whose
    descendants is; if several (a DAG), the most probable of them. When no term reaches
    ``threshold`` (the classes have no common root), the most probable term. Writes the term
    (string), its label (string) and its probability (float32). Spec keys: ``classes``,
    ``class_labels``, ``descendants`` (for each class, the indices of its descendants among the
    classes, itself excluded), ``threshold``, ``term_column``, ``label_column``,
    ``probability_column``.

``"top_k"``
    The ``k`` classes of highest probability, best first (ties: the class with fewer descendants,
    then the lower index): a list of ``k`` strings and a fixed-size list of ``k`` float32. Spec
    keys: ``classes``, ``k``, ``descendants`` (optional, for the tie-break), ``term_column``,
    ``probability_column``.

``"vector"``
    The matrix itself as a fixed-size list of float32: ``dim``, ``column``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

ONTOLOGY_CALL = "ontology_call"
TOP_K = "top_k"
VECTOR = "vector"


def to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def descendant_lists(descendant_cc: Any) -> list[list[int]]:
    """For a 0/1 (c, c) matrix whose row i marks the descendants of class i (itself included): row i's
    other ones, as index lists (plain data for a recipe, O(edges) rather than O(c^2))."""
    d = np.asarray(descendant_cc) > 0
    return [[int(j) for j in np.flatnonzero(row) if j != i] for i, row in enumerate(d)]


def _descendant_matrix(descendants: Sequence[Sequence[int]], c: int) -> np.ndarray:
    """(c, c) bool, strict descendants only (no diagonal)."""
    d = np.zeros((c, c), dtype=bool)
    for i, row in enumerate(descendants):
        d[i, list(row)] = True
    np.fill_diagonal(d, False)
    return d


def ontology_call(probs_nc: np.ndarray, descendants: Sequence[Sequence[int]], threshold: float = 0.5) -> np.ndarray:
    """Index of each cell's call: the most specific class with probability >= ``threshold`` (see the module doc)."""
    c = probs_nc.shape[1]
    strict_cc = _descendant_matrix(descendants, c)
    n_desc_c = strict_cc.sum(1)
    above_nc = probs_nc >= threshold
    # a class with a descendant above the threshold is not the most specific one
    shadowed_nc = (above_nc.astype(np.float32) @ strict_cc.T.astype(np.float32)) > 0
    candidate_nc = above_nc & ~shadowed_nc
    none_n = ~candidate_nc.any(1)
    candidate_nc[none_n] = True  # no class reaches the threshold: the most probable one
    score_nc = np.where(candidate_nc, probs_nc.astype(np.float64), -np.inf)
    best_n = score_nc.max(1, keepdims=True)
    # ties: fewer descendants, then the lower index
    tie_nc = (score_nc == best_n) & candidate_nc
    key_nc = np.where(tie_nc, n_desc_c[None, :].astype(np.float64) * c + np.arange(c)[None, :], np.inf)
    return key_nc.argmin(1)


def top_k(probs_nc: np.ndarray, k: int, descendants: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(n, k) class indices by decreasing probability; ties: fewer descendants, then the lower index."""
    n, c = probs_nc.shape
    n_desc_c = (np.array([len(d) for d in descendants]) if descendants is not None else np.zeros(c, dtype=int))
    # lexsort sorts by the last key first: probability (descending), then specificity, then index
    order = np.lexsort((np.broadcast_to(np.arange(c), (n, c)), np.broadcast_to(n_desc_c, (n, c)), -probs_nc), axis=1)
    return order[:, :k]


class ColumnBuilder:
    """One spec's columns: ``fields()`` for the schema, ``build(prediction)`` for a batch."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = dict(spec)
        self.key = str(spec["key"])

    def fields(self) -> list[pa.Field]:
        raise NotImplementedError

    def build(self, prediction: Mapping[str, Any]) -> list[pa.Array]:
        raise NotImplementedError

    def _matrix(self, prediction: Mapping[str, Any], width: int) -> np.ndarray:
        m = to_numpy(prediction[self.key])
        if m.ndim != 2 or m.shape[1] != width:
            raise ValueError(f"{self.key} has shape {m.shape}, expected (n, {width})")
        return m


class VectorColumn(ColumnBuilder):
    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.dim = int(spec["dim"])
        self.column = str(spec["column"])
        if self.dim < 1:
            raise ValueError(f"dim must be positive, got {self.dim}")

    def fields(self) -> list[pa.Field]:
        return [pa.field(self.column, pa.list_(pa.float32(), self.dim))]

    def build(self, prediction: Mapping[str, Any]) -> list[pa.Array]:
        z = np.ascontiguousarray(self._matrix(prediction, self.dim).astype(np.float32, copy=False))
        return [pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)), self.dim)]


class OntologyCallColumns(ColumnBuilder):
    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.classes = np.asarray([str(c) for c in spec["classes"]], dtype=object)
        labels = spec.get("class_labels") or [""] * len(self.classes)
        self.labels = np.asarray([str(x) for x in labels], dtype=object)
        self.descendants = [list(d) for d in spec.get("descendants") or [[] for _ in self.classes]]
        self.threshold = float(spec.get("threshold", 0.5))
        if len(self.labels) != len(self.classes) or len(self.descendants) != len(self.classes):
            raise ValueError("ontology_call: classes, class_labels and descendants differ in length")
        self.names = (str(spec.get("term_column", "cell_type_ontology_term_id")),
                      str(spec.get("label_column", "cell_type")),
                      str(spec.get("probability_column", "cell_type_probability")))

    def fields(self) -> list[pa.Field]:
        term, label, probability = self.names
        return [pa.field(term, pa.string()), pa.field(label, pa.string()), pa.field(probability, pa.float32())]

    def build(self, prediction: Mapping[str, Any]) -> list[pa.Array]:
        probs_nc = self._matrix(prediction, len(self.classes))
        call_n = ontology_call(probs_nc, self.descendants, self.threshold)
        p_n = probs_nc[np.arange(len(call_n)), call_n].astype(np.float32)
        return [pa.array(self.classes[call_n], type=pa.string()), pa.array(self.labels[call_n], type=pa.string()),
                pa.array(p_n, type=pa.float32())]


class TopKColumns(ColumnBuilder):
    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.classes = np.asarray([str(c) for c in spec["classes"]], dtype=object)
        self.k = int(spec["k"])
        if not 1 <= self.k <= len(self.classes):
            raise ValueError(f"top_k: k must be between 1 and the {len(self.classes)} classes, got {self.k}")
        descendants = spec.get("descendants")
        self.descendants = [list(d) for d in descendants] if descendants is not None else None
        self.names = (str(spec.get("term_column", "cell_type_top_k_ontology_term_id")),
                      str(spec.get("probability_column", "cell_type_top_k_probability")))

    def fields(self) -> list[pa.Field]:
        term, probability = self.names
        return [pa.field(term, pa.list_(pa.string())), pa.field(probability, pa.list_(pa.float32(), self.k))]

    def build(self, prediction: Mapping[str, Any]) -> list[pa.Array]:
        probs_nc = self._matrix(prediction, len(self.classes))
        n = probs_nc.shape[0]
        top_nk = top_k(probs_nc, self.k, self.descendants)
        p_nk = np.take_along_axis(probs_nc, top_nk, axis=1).astype(np.float32)
        offsets = pa.array(np.arange(0, n * self.k + 1, self.k, dtype=np.int32))
        terms = pa.ListArray.from_arrays(offsets, pa.array(self.classes[top_nk.reshape(-1)], type=pa.string()))
        probabilities = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(p_nk).reshape(-1)), self.k)
        return [terms, probabilities]


BUILDERS: dict[str, type[ColumnBuilder]] = {ONTOLOGY_CALL: OntologyCallColumns, TOP_K: TopKColumns, VECTOR: VectorColumn}


def column_builder(spec: Mapping[str, Any]) -> ColumnBuilder:
    kind = spec.get("kind")
    if kind not in BUILDERS:
        raise ValueError(f"unknown prediction column kind {kind!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[kind](spec)
