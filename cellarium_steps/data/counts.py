"""Where a file's counts are: ``X``, ``raw/X`` or a layer, chosen by name or found (``counts="auto"``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cellarium_steps.data.csc import csc_refused
from cellarium_steps.data.errors import InputError
from cellarium_steps.data.sources import STREAMABLE_ENCODINGS, MatrixInfo, Store

logger = logging.getLogger(__name__)

COUNTS_HELP = "'auto', 'X', 'raw' or 'layers/NAME'"


@dataclass(frozen=True)
class CountsLocation:
    """A resolved ``counts`` choice: its name, the matrix's key and the dataframe naming its genes."""

    choice: str  # "X", "raw" or "layers/NAME"
    matrix_key: str  # "X", "raw/X" or "layers/NAME"
    var_key: str  # "var", or "raw/var" (raw/X may have more genes than var)


def counts_location(choice: str) -> CountsLocation:
    """The location of an explicit choice; ``InputError`` for anything but X, raw or layers/NAME."""
    if choice == "X":
        return CountsLocation("X", "X", "var")
    if choice == "raw":
        return CountsLocation("raw", "raw/X", "raw/var")
    if choice.startswith("layers/") and len(choice) > len("layers/") and "/" not in choice[len("layers/"):]:
        return CountsLocation(choice, choice, "var")
    raise InputError(f"--counts: {choice!r} is not one of {COUNTS_HELP}")


def check_counts_option(counts: str) -> None:
    if counts != "auto":
        counts_location(counts)


def resolve_counts(store: Store, counts: str, require_counts: bool = True,
                   allow_csc: bool = False) -> tuple[CountsLocation, MatrixInfo]:
    """The matrix ``counts`` names in this file, checked to be one whose rows can be streamed (or, with
    ``allow_csc``, a CSC matrix, which only ``convert`` reads: see :mod:`~cellarium_steps.data.csc`).

    ``auto``: ``X`` when it holds integer counts, else ``raw/X`` when it does (logged), else an
    ``InputError`` saying what each candidate holds and which option to pass. Whether a float
    matrix holds integers is decided on its first stored values (:meth:`Store.first_non_integer`).
    Without ``require_counts``, ``auto`` falls back to ``X`` (normalized data for a model that
    takes it).
    """
    path = store.path
    if counts != "auto":
        location = counts_location(counts)
        info = store.matrix_info(location.matrix_key)
        if info is None:
            raise InputError(f"{path}: no matrix at {location.matrix_key!r} (--counts {counts}){_found(store)}")
        info = _streamable(path, info, counts, allow_csc)
        bad = store.first_non_integer_at(info) if require_counts else None
        if bad is not None:  # a normalized matrix shows in its first values: fail before any pass
            value, row = bad
            what = "non-integer values" if np.isfinite(value) else "NaN or infinite values"
            raise InputError(f"{path}: {info.key} has {what} (e.g. {value:g}, cell row {row}; --counts {counts}): "
                             "raw integer UMI counts are required, not normalized data")
        return location, info

    x_info = store.matrix_info("X")
    if x_info is None:
        raise InputError(f"{path}: no matrix at 'X'{_found(store)}")
    x_bad = store.first_non_integer(x_info)
    if x_bad is None:
        return counts_location("X"), _streamable(path, x_info, "auto", allow_csc)
    raw_info = store.matrix_info("raw/X")
    raw_bad = None if raw_info is None else store.first_non_integer(raw_info)
    if raw_info is not None and raw_bad is None:
        logger.info("%s: X holds non-integer values (e.g. %g); reading the integer counts in raw/X (--counts raw)",
                    path, x_bad)
        return counts_location("raw"), _streamable(path, raw_info, "auto", allow_csc)
    if not require_counts:
        logger.info("%s: X holds non-integer values (e.g. %g); read as they are (counts not required)", path, x_bad)
        return counts_location("X"), _streamable(path, x_info, "auto", allow_csc)
    x_bad, x_row = store.first_non_integer_at(x_info) or (x_bad, -1)  # the row only now: it reads X's indptr
    found = [f"X holds non-integer values (e.g. {x_bad:g}, cell row {x_row})"]
    found.append("no raw/X" if raw_info is None else f"raw/X holds non-integer values (e.g. {raw_bad:g})")
    layers = _integer_layers(store)
    hint = f"pass --counts {layers[0]}" if layers else "raw integer UMI counts are required"
    if layers:
        found.append(f"{', '.join(layers)} hold{'s' if len(layers) == 1 else ''} integer counts")
    raise InputError(f"{path}: no integer counts found (--counts auto): {'; '.join(found)}: {hint}")


def _streamable(path: str, info: MatrixInfo, counts: str, allow_csc: bool = False) -> MatrixInfo:
    if info.encoding == "csc_matrix" and allow_csc:
        return info
    if info.encoding == "csc_matrix":
        raise csc_refused(path, info.key, f" (--counts {counts})")
    if info.encoding not in STREAMABLE_ENCODINGS or info.n_rows < 0:
        raise InputError(f"{path}: {info.key} has unsupported encoding {info.encoding!r} (--counts {counts})")
    return info


def _layer_names(store: Store) -> list[str]:
    return [f"layers/{name}" for name in store["layers"]] if "layers" in store else []


def _integer_layers(store: Store) -> list[str]:
    layers = []
    for key in _layer_names(store):
        info = store.matrix_info(key)
        if info is not None and info.encoding in STREAMABLE_ENCODINGS and store.first_non_integer(info) is None:
            layers.append(key)
    return layers


def _found(store: Store) -> str:
    present = [key for key in ("X", "raw/X") if key in store] + _layer_names(store)
    return f"; the file has {', '.join(present)}" if present else "; the file has no matrix"
