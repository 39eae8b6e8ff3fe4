"""The label pass: count each label of an obs column, and check it against the Cell Ontology, reading
the obs column alone (no count matrix)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellarium_steps.data.errors import InputError
from cellarium_steps.data.reader import ShardReader
from cellarium_steps.data.shards import ShardCollection
from cellarium_steps.ontology import is_deprecated, is_unlabelled, ontology_version, validate_cl_names

logger = logging.getLogger("cellarium_steps")


@dataclass
class LabelSummary:
    """What one pass over the label column found."""

    key: str
    n_cells: int
    n_labelled: int
    counts: dict[str, int] = field(default_factory=dict)  # label -> cells, labelled values only

    @property
    def labels(self) -> list[str]:
        return sorted(self.counts)


def scan_labels(collection: ShardCollection, key: str, *, check_ontology: bool = True) -> LabelSummary:
    """Count the labelled cells and their labels from the obs column alone (no count matrix is read).

    With ``check_ontology``, every distinct label must be a Cell Ontology id: InputError naming the
    value and the file otherwise.
    """
    reader = ShardReader(collection, require_counts=False)
    counts: dict[str, int] = {}
    n_cells = 0
    try:
        for shard in collection.shards:
            values = reader.read_obs_column(shard, key, np.arange(shard.n_obs))
            n_cells += len(values)
            shard_labels: dict[str, int] = {}
            for value, count in Counter(values.tolist()).items():
                text = _label_text(value)
                if text is not None:
                    shard_labels[text] = shard_labels.get(text, 0) + count
            if check_ontology and shard_labels:
                try:
                    validate_cl_names(shard_labels)
                except ValueError:
                    bad = next(v for v in shard_labels if not _is_cl_id(v))
                    raise InputError(
                        f"{shard.path}: obs[{key!r}] has {bad!r} ({shard_labels[bad]} cells), which is not a Cell "
                        f"Ontology id known to {ontology_version()}; use CL ids such as 'CL:0000624', or 'unknown'"
                    ) from None
            for label, count in shard_labels.items():
                counts[label] = counts.get(label, 0) + count
        if check_ontology:
            deprecated = [label for label in counts if is_deprecated(label)]
            if deprecated:
                logger.warning("obs[%r]: deprecated Cell Ontology terms %s have no place in the hierarchy", key, deprecated)
    finally:
        reader.close()
    return LabelSummary(key=key, n_cells=n_cells, n_labelled=sum(counts.values()), counts=counts)


def _label_text(value: Any) -> str | None:
    if is_unlabelled(value):
        return None
    if isinstance(value, bytes):
        value = value.decode()
    return str(value)


def _is_cl_id(value: str) -> bool:
    try:
        validate_cl_names([value])
    except ValueError:
        return False
    return True


def require_labels(summary: LabelSummary, inputs: Sequence[str]) -> None:
    if summary.n_labelled == 0:
        raise InputError(f"obs[{summary.key!r}]: no labelled cells in {len(inputs)} input file(s) (all missing or 'unknown')")
    if len(summary.counts) < 2:
        raise InputError(f"obs[{summary.key!r}]: only one cell type ({summary.labels[0]!r}); a classifier needs two or more")
