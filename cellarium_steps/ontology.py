"""The Cell Ontology (CL), offline, through the copy that ships inside cellxgene-ontology-guide.

Everything here reads the CL release bundled with the installed ``cellxgene-ontology-guide``
(:func:`ontology_version` says which); nothing touches the network. The graph is the one that
package records for CL: each term's ``ancestors`` (the transitive closure of its subclass/is_a
parents, each with its distance), so a term's parents are its ancestors at distance 1. Deprecated
terms are still known (and pass :func:`validate_cl_names`) but have no place in the hierarchy.

Conventions, for a list ``cl_names`` of ids such as ``"CL:0000624"``:

* :func:`descendant_tensor` row ``i`` marks the descendants of ``cl_names[i]`` within the list,
  itself included (the matrix SOCAM propagates probabilities with);
* :func:`compute_cl_distance_matrix` is the shortest-path distance in the undirected is_a graph
  of the whole ontology (so two siblings are 2 apart), as cellarium-ml's scVI ontology metric uses.
"""

from __future__ import annotations

import functools
import math
import re
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

#: label values that mean "no cell type": such cells are left out of supervised training.
UNLABELLED_VALUES = frozenset({"", "unknown", "Unknown", "nan", "NaN", "None", "na", "NA"})

_CL_ID = re.compile(r"^CL:\d{7}$")


def is_unlabelled(value: Any) -> bool:
    """True for a missing label: None, NaN, or one of :data:`UNLABELLED_VALUES`."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() in UNLABELLED_VALUES


@functools.cache
def _parser() -> Any:
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    return OntologyParser()


@functools.cache
def _terms() -> dict[str, dict[str, Any]]:
    """CL id -> {"ancestors": {id: distance}, "label": ..., "deprecated": ...} as the package stores it."""
    return _parser().cxg_schema.ontology("CL")


def ontology_version() -> str:
    """The CL release in use, e.g. ``"CL v2026-03-26 (cellxgene schema 7.1.0)"``."""
    schema = _parser().cxg_schema
    return f"CL {schema.supported_ontologies['CL']['version']} (cellxgene schema {schema.version})"


def validate_cl_names(names: Iterable[Any]) -> list[str]:
    """Return ``names`` as a list of str; raise ValueError naming every value that is not a known CL id."""
    names = list(names)
    terms = _terms()
    bad: list[Any] = []
    for name in names:
        known = isinstance(name, str) and _CL_ID.match(name) is not None and name in terms
        if not known and name not in bad:
            bad.append(name)
    if bad:
        shown = ", ".join(repr(b) for b in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(f"not Cell Ontology ids known to {ontology_version()}: {shown}")
    return [str(n) for n in names]


def is_deprecated(cl_name: str) -> bool:
    """True for a CL term the ontology keeps only as obsolete."""
    return bool(_terms()[validate_cl_names([cl_name])[0]].get("deprecated", False))


def _ancestors(cl_name: str) -> dict[str, int]:
    return _terms()[cl_name]["ancestors"]


def ancestors_within(cl_name: str, cl_names: Sequence[str]) -> list[str]:
    """The ancestors of ``cl_name`` (itself excluded) that are in ``cl_names``, in the order of ``cl_names``."""
    validate_cl_names([cl_name, *cl_names])
    ancestors = _ancestors(cl_name)
    return [c for c in cl_names if c in ancestors and c != cl_name]


def all_ancestors(cl_names: Iterable[str]) -> list[str]:
    """Every CL ancestor of the given terms (within CL), sorted; the terms themselves are not added."""
    names = validate_cl_names(cl_names)
    terms = _terms()
    return sorted({a for n in names for a in _ancestors(n) if a in terms} - set(names))


def is_term_or_descendant(predicted: Sequence[str], truth: Sequence[str]) -> list[bool]:
    """Whether each predicted term is the true term or one of its descendants: right for a label at mixed
    depth (a naive CD4 T call for a cell labelled CD4 T). Unlabelled truths count as wrong; callers leave
    them out."""
    known: dict[tuple[str, str], bool] = {}
    for pair in zip(map(str, predicted), map(str, truth), strict=True):
        if pair not in known:
            p, t = pair
            known[pair] = p == t or (not is_unlabelled(p) and not is_unlabelled(t)
                                     and t in _ancestors(validate_cl_names([p])[0]))
    return [known[pair] for pair in zip(map(str, predicted), map(str, truth))]


def descendant_tensor(cl_names: Sequence[str]) -> torch.Tensor:
    """(n, n) float 0/1 tensor: ``[i, j] = 1`` when ``cl_names[j]`` is ``cl_names[i]`` or one of its descendants."""
    names = validate_cl_names(cl_names)
    if len(set(names)) != len(names):
        raise ValueError("cl_names has duplicates")
    n = len(names)
    d = torch.eye(n)
    position = {name: i for i, name in enumerate(names)}
    for j, name in enumerate(names):
        for ancestor in _ancestors(name):
            i = position.get(ancestor)
            if i is not None:
                d[i, j] = 1.0
    return d


def term_labels(cl_names: Sequence[str]) -> list[str]:
    """The ontology's label of each term, e.g. ``"CD4-positive, alpha-beta T cell"``."""
    names = validate_cl_names(cl_names)
    terms = _terms()
    return [str(terms[n]["label"]) for n in names]


@functools.cache
def _undirected_is_a_graph() -> dict[str, tuple[str, ...]]:
    """CL term -> its neighbours (parents and children) in the is_a graph."""
    terms = _terms()
    neighbours: dict[str, set[str]] = {t: set() for t in terms}
    for term, meta in terms.items():
        for ancestor, distance in meta["ancestors"].items():
            if distance == 1 and ancestor in neighbours:
                neighbours[term].add(ancestor)
                neighbours[ancestor].add(term)
    return {t: tuple(sorted(n)) for t, n in neighbours.items()}


def compute_cl_distance_matrix(cl_names: Sequence[str]) -> pd.DataFrame:
    """Shortest-path distances (edges) between the terms in the undirected is_a graph of all of CL.

    Symmetric, zero on the diagonal, indexed by ``cl_names`` on both axes; ``inf`` between terms
    with no path (CL is connected through its root, so only for deprecated, detached terms).
    """
    names = validate_cl_names(cl_names)
    graph = _undirected_is_a_graph()
    targets = set(names)
    out = np.full((len(names), len(names)), np.inf)
    position: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        position.setdefault(name, []).append(i)
    for i, source in enumerate(names):
        # Breadth-first search until every target is reached.
        seen = {source: 0}
        queue = deque([source])
        remaining = len(targets) - 1
        while queue and remaining > 0:
            node = queue.popleft()
            for nxt in graph[node]:
                if nxt not in seen:
                    seen[nxt] = seen[node] + 1
                    if nxt in targets:
                        remaining -= 1
                    queue.append(nxt)
        for target, distance in seen.items():
            for j in position.get(target, ()):
                out[i, j] = distance
    out = np.minimum(out, out.T)  # BFS is exact both ways; guard against float noise only
    return pd.DataFrame(out, index=list(names), columns=list(names))
