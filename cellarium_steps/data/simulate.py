"""Demo shards that look like real PBMC UMI data, so the pipeline can be run and timed at any scale.

Two generators:

* :func:`simulate_shards` draws negative-binomial counts from a small generative model
  (baseline expression, cell-type marker programs, batch-specific depth and capture
  efficiency), with known structure, at any number of cells.
* :func:`resample_shards` bootstraps a small real file up to a large number of cells,
  binomially thinning each copy so that duplicated cells are not identical.

Both write one shard at a time, so peak memory is bounded by one shard, not by ``n_cells``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellarium_steps.atomic import atomic_path

UNKNOWN_LABEL = "unknown"
UNKNOWN_FRACTION = 0.1

# (Cell Ontology id, label, canonical marker symbols, PBMC-like abundance weight); the first six are
# the types the demo is about, the rest only come in when more than six types are asked for.
_CELL_TYPES: tuple[tuple[str, str, tuple[str, ...], float], ...] = (
    ("CL:0000624", "CD4-positive, alpha-beta T cell", ("CD3D", "CD3E", "IL7R", "CD4", "LTB", "TCF7"), 0.35),
    ("CL:0000625", "CD8-positive, alpha-beta T cell", ("CD3D", "CD3E", "CD8A", "CD8B", "GZMK", "CCL5"), 0.18),
    ("CL:0000236", "B cell", ("MS4A1", "CD79A", "CD79B", "CD19", "BANK1", "PAX5"), 0.12),
    ("CL:0000623", "natural killer cell", ("NKG7", "GNLY", "KLRD1", "KLRF1", "PRF1", "GZMB"), 0.10),
    ("CL:0001054", "CD14-positive monocyte", ("CD14", "LYZ", "S100A8", "S100A9", "FCN1", "VCAN"), 0.20),
    ("CL:0000784", "plasmacytoid dendritic cell", ("LILRA4", "IL3RA", "CLEC4C", "IRF7", "TCF4", "PLD4"), 0.02),
    ("CL:0002396", "CD14-low, CD16-positive monocyte", ("FCGR3A", "MS4A7", "CDKN1C", "LST1"), 0.05),
    ("CL:0000990", "conventional dendritic cell", ("FCER1A", "CD1C", "CLEC10A", "HLA-DQA1"), 0.02),
    ("CL:0000786", "plasma cell", ("JCHAIN", "MZB1", "IGHG1", "XBP1"), 0.01),
    ("CL:0000233", "platelet", ("PPBP", "PF4", "GP9", "ITGA2B"), 0.01),
    ("CL:0000232", "erythrocyte", ("HBB", "HBA1", "HBA2", "ALAS2"), 0.005),
    ("CL:0000798", "gamma-delta T cell", ("TRDC", "TRGC1", "TRGC2", "KLRC1"), 0.02),
    ("CL:0000940", "mucosal invariant T cell", ("SLC4A10", "KLRB1", "ZBTB16", "RORC"), 0.02),
    ("CL:0000792", "CD4-positive, CD25-positive, alpha-beta regulatory T cell", ("FOXP3", "IL2RA", "CTLA4"), 0.02),
)

_MT_GENES = (
    "MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8", "MT-ATP6", "MT-CO3",
    "MT-ND3", "MT-ND4L", "MT-ND4", "MT-ND5", "MT-ND6", "MT-CYB",
)  # fmt: skip
_RIBO_GENES = tuple(f"RPL{i}" for i in range(3, 42)) + tuple(f"RPS{i}" for i in range(2, 30))

_CELLS_PER_CHUNK = 2048


@dataclass(frozen=True)
class _Model:
    """Parameters shared by every shard; per-cell draws are made shard by shard."""

    var: pd.DataFrame
    type_ids: tuple[str, ...]
    type_labels: tuple[str, ...]
    id_categories: tuple[str, ...]
    label_categories: tuple[str, ...]
    batch_names: tuple[str, ...]
    batch_weight_b: np.ndarray
    type_weight_bt: np.ndarray
    log_depth_mean_b: np.ndarray
    log_depth_sd: float
    profile_btg: np.ndarray
    inv_dispersion_g: np.ndarray


def _gene_names(n_genes: int) -> list[str]:
    """Marker symbols first so they survive a small ``n_genes``, then MT-/RP genes, then ``GENE0001``..."""
    names: list[str] = []
    seen: set[str] = set()
    for symbol in [m for _, _, markers, _ in _CELL_TYPES for m in markers] + list(_MT_GENES + _RIBO_GENES):
        if symbol not in seen:
            seen.add(symbol)
            names.append(symbol)
    width = max(4, len(str(n_genes)))
    i = 1
    while len(names) < n_genes:
        names.append(f"GENE{i:0{width}d}")
        i += 1
    return names[:n_genes]


def _type_table(n_cell_types: int) -> list[tuple[str, str, tuple[str, ...], float]]:
    """The first ``n_cell_types`` entries, cycling when more programs than known types are asked for.

    Programs beyond the table reuse its ids: several expression programs under one label,
    as subclusters of one annotated type are in real data.
    """
    return [_CELL_TYPES[k % len(_CELL_TYPES)] for k in range(n_cell_types)]


def _build_model(
    n_genes: int,
    n_batches: int,
    n_cell_types: int,
    rng: np.random.Generator,
) -> _Model:
    symbols_g = _gene_names(n_genes)
    var = pd.DataFrame(
        {"gene_ids": [f"ENSG{i + 1:011d}" for i in range(n_genes)]},
        index=pd.Index(symbols_g),
    )
    symbol_to_g = {s: g for g, s in enumerate(symbols_g)}

    is_mt_g = np.array([s.startswith("MT-") for s in symbols_g])
    is_ribo_g = np.array([s.startswith(("RPL", "RPS")) for s in symbols_g])
    is_marker_g = np.zeros(n_genes, dtype=bool)
    is_marker_g[[symbol_to_g[m] for _, _, markers, _ in _CELL_TYPES for m in markers if m in symbol_to_g]] = True
    is_other_g = ~(is_mt_g | is_ribo_g)
    baseline_g = np.exp(rng.normal(0.0, 2.2, size=n_genes))
    baseline_g[is_mt_g] = np.exp(rng.normal(0.0, 0.6, size=is_mt_g.sum()))
    baseline_g[is_ribo_g] = np.exp(rng.normal(0.0, 0.4, size=is_ribo_g.sum()))
    # Known markers sit low in the baseline so that their program, not the baseline, makes them stand out.
    baseline_g[is_marker_g] = np.exp(rng.normal(np.log(0.5), 0.7, size=is_marker_g.sum()))
    # PBMC-like shares of UMIs: ~5% mitochondrial, ~25% ribosomal protein genes.
    for is_group_g, share in ((is_mt_g, 0.05), (is_ribo_g, 0.25), (is_other_g, 0.70)):
        if is_group_g.any():
            baseline_g[is_group_g] *= share / baseline_g[is_group_g].sum()
    log_baseline_g = np.log(baseline_g)

    table = _type_table(n_cell_types)
    generic_g = np.flatnonzero(~(is_mt_g | is_ribo_g | is_marker_g))
    n_markers = max(5, n_genes // 40)
    log_fold_tg = rng.normal(0.0, 0.1, size=(n_cell_types, n_genes))
    for t, (_, _, markers, _) in enumerate(table):
        canonical_g = [symbol_to_g[m] for m in markers if m in symbol_to_g] if t < len(_CELL_TYPES) else []
        n_extra = min(max(n_markers - len(canonical_g), 0), generic_g.size)
        extra_g = rng.choice(generic_g, size=n_extra, replace=False)
        marker_g = np.concatenate([np.asarray(canonical_g, dtype=np.int64), extra_g])
        log_fold_tg[t, marker_g] += rng.normal(np.log(40.0), 0.6, size=marker_g.size)

    log_capture_bg = rng.normal(0.0, 0.3, size=(n_batches, n_genes))
    log_profile_btg = log_baseline_g[None, None, :] + log_fold_tg[None, :, :] + log_capture_bg[:, None, :]
    profile_btg = np.exp(log_profile_btg - log_profile_btg.max(axis=-1, keepdims=True))
    profile_btg /= profile_btg.sum(axis=-1, keepdims=True)

    # Low-expressed genes are more overdispersed in real UMI data.
    log_dispersion_g = rng.normal(np.log(0.3), 0.5, size=n_genes) - 0.15 * (log_baseline_g - log_baseline_g.mean())
    inv_dispersion_g = np.exp(-np.clip(log_dispersion_g, np.log(0.01), np.log(10.0)))

    median_depth_b = np.geomspace(1500.0, 6000.0, n_batches) if n_batches > 1 else np.array([3000.0])
    log_depth_mean_b = np.log(rng.permutation(median_depth_b))

    weight_t = np.array([w for _, _, _, w in table])
    weight_t /= weight_t.sum()
    type_weight_bt = rng.dirichlet(40.0 * weight_t * n_cell_types + 0.5, size=n_batches)
    batch_weight_b = rng.dirichlet(np.full(n_batches, 8.0))

    id_categories = tuple(dict.fromkeys([cid for cid, _, _, _ in table] + [UNKNOWN_LABEL]))
    label_categories = tuple(dict.fromkeys([lab for _, lab, _, _ in table] + [UNKNOWN_LABEL]))
    width = len(str(n_batches))
    return _Model(
        var=var,
        type_ids=tuple(cid for cid, _, _, _ in table),
        type_labels=tuple(lab for _, lab, _, _ in table),
        id_categories=id_categories,
        label_categories=label_categories,
        batch_names=tuple(f"batch{b + 1:0{width}d}" for b in range(n_batches)),
        batch_weight_b=batch_weight_b,
        type_weight_bt=type_weight_bt,
        log_depth_mean_b=log_depth_mean_b,
        log_depth_sd=0.45,
        profile_btg=profile_btg,
        inv_dispersion_g=inv_dispersion_g,
    )


def _sample_counts(
    model: _Model,
    batch_n: np.ndarray,
    type_n: np.ndarray,
    rng: np.random.Generator,
) -> sp.csr_matrix:
    """NB counts as a gamma-Poisson mixture, in chunks so the dense rate matrix stays small."""
    blocks: list[sp.csr_matrix] = []
    n_genes = model.profile_btg.shape[-1]
    for start in range(0, batch_n.size, _CELLS_PER_CHUNK):
        b_c = batch_n[start : start + _CELLS_PER_CHUNK]
        t_c = type_n[start : start + _CELLS_PER_CHUNK]
        depth_c = np.exp(rng.normal(model.log_depth_mean_b[b_c], model.log_depth_sd))
        mu_cg = depth_c[:, None] * model.profile_btg[b_c, t_c]
        rate_cg = rng.gamma(model.inv_dispersion_g[None, :], mu_cg / model.inv_dispersion_g[None, :])
        x_cg = rng.poisson(rate_cg).astype(np.int32)
        blocks.append(sp.csr_matrix(x_cg))
    if not blocks:
        return sp.csr_matrix((0, n_genes), dtype=np.int32)
    x_ng = sp.vstack(blocks, format="csr")
    x_ng.data = x_ng.data.astype(np.int32, copy=False)
    return x_ng


def _shard_sizes(n_cells: int, n_shards: int) -> list[int]:
    base, extra = divmod(n_cells, n_shards)
    return [base + (1 if s < extra else 0) for s in range(n_shards)]


def _write_shard(adata: ad.AnnData, path: str) -> None:
    """Uncompressed, so that the readers' row-range slices are fast; renamed into place when complete."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def simulate_shards(
    output_dir: str,
    n_cells: int = 20000,
    n_genes: int = 2000,
    n_batches: int = 4,
    n_cell_types: int = 6,
    n_shards: int = 4,
    seed: int = 0,
    batch_key: str = "batch",
    cell_type_key: str = "cell_type_ontology_term_id",
) -> list[str]:
    """Write ``n_shards`` PBMC-like ``shard_###.h5ad`` files of raw UMI counts; return their paths.

    Cells of all batches are mixed in every shard (each cell's batch and type are drawn
    independently), as a shuffled-then-split real collection would be. Every shard carries
    the full list of batch and cell-type categories, so shards validate against each other
    even when one lacks a batch. About 10% of cells are labelled ``"unknown"`` to play the
    query cells of label transfer; their counts still come from a real program.
    Peak memory is one shard's CSR matrix plus one dense chunk of cells.
    """
    if n_cells < 0 or n_genes < 1 or n_batches < 1 or n_cell_types < 1 or n_shards < 1:
        raise ValueError("n_cells must be >= 0 and n_genes, n_batches, n_cell_types, n_shards >= 1")
    os.makedirs(output_dir, exist_ok=True)
    seed_seq = np.random.SeedSequence(seed)
    model_seq, *shard_seqs = seed_seq.spawn(n_shards + 1)
    model = _build_model(n_genes, n_batches, n_cell_types, np.random.default_rng(model_seq))

    id_width = max(6, len(str(max(n_cells - 1, 0))))
    shard_width = max(3, len(str(n_shards - 1)))
    type_ids_t = np.array(model.type_ids, dtype=object)
    type_labels_t = np.array(model.type_labels, dtype=object)
    paths: list[str] = []
    first_cell = 0
    for s, (n_shard, shard_seq) in enumerate(zip(_shard_sizes(n_cells, n_shards), shard_seqs)):
        rng = np.random.default_rng(shard_seq)
        batch_n = rng.choice(n_batches, size=n_shard, p=model.batch_weight_b)
        # Inverse-CDF per cell, since each batch has its own composition.
        cdf_nt = np.cumsum(model.type_weight_bt[batch_n], axis=1)
        type_n = np.minimum((rng.random(n_shard)[:, None] > cdf_nt).sum(axis=1), n_cell_types - 1)
        is_unknown_n = rng.random(n_shard) < UNKNOWN_FRACTION
        x_ng = _sample_counts(model, batch_n, type_n, rng)

        ids_n = np.where(is_unknown_n, UNKNOWN_LABEL, type_ids_t[type_n])
        labels_n = np.where(is_unknown_n, UNKNOWN_LABEL, type_labels_t[type_n])
        obs = pd.DataFrame(
            {
                batch_key: pd.Categorical.from_codes(batch_n, categories=list(model.batch_names)),
                cell_type_key: pd.Categorical(ids_n, categories=list(model.id_categories)),
                "cell_type": pd.Categorical(labels_n, categories=list(model.label_categories)),
            },
            index=pd.Index([f"cell-{first_cell + i:0{id_width}d}-s{s}" for i in range(n_shard)]),
        )
        adata = ad.AnnData(X=x_ng, obs=obs, var=model.var.copy())
        path = os.path.join(output_dir, f"shard_{s:0{shard_width}d}.h5ad")
        _write_shard(adata, path)
        paths.append(path)
        first_cell += n_shard
    return paths


def thin_counts(x: sp.csr_matrix, fraction: float | np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    """Keep each UMI independently with probability ``fraction`` (a scalar, or one value per row).

    Binomial thinning is what sequencing a library less deeply does, so a thinned cell is a
    plausible shallower observation of the same cell, unlike scaling which would give fractions.
    """
    x = sp.csr_matrix(x)
    data = np.asarray(x.data)
    if data.size and (np.any(data < 0) or not np.array_equal(data, np.round(data))):
        raise ValueError("thin_counts needs non-negative integer counts")
    fraction_arr = np.asarray(fraction, dtype=np.float64)
    if np.any((fraction_arr < 0) | (fraction_arr > 1)):
        raise ValueError("fraction must lie in [0, 1]")
    if fraction_arr.ndim == 0:
        p = fraction_arr
    elif fraction_arr.shape == (x.shape[0],):
        p = np.repeat(fraction_arr, np.diff(x.indptr))
    else:
        raise ValueError(
            f"fraction must be a scalar or have one value per row ({x.shape[0]}), got shape {fraction_arr.shape}"
        )
    thinned = rng.binomial(data.astype(np.int64), p).astype(np.int32)
    out = sp.csr_matrix((thinned, x.indices.copy(), x.indptr.copy()), shape=x.shape)
    out.eliminate_zeros()
    return out


def resample_shards(
    source_h5ad: str,
    output_dir: str,
    n_cells: int,
    n_shards: int,
    seed: int = 0,
    thinning_low: float = 0.5,
    thinning_high: float = 1.0,
    obs_columns: Sequence[str] | None = None,
) -> list[str]:
    """Bootstrap a small real file to ``n_cells`` cells in ``n_shards`` shards; return their paths.

    Each new cell is a source cell drawn with replacement and thinned by a fraction drawn
    uniformly from ``[thinning_low, thinning_high]``, so copies differ and depth varies while the
    real gene-gene structure and batch effects are kept. Obs columns keep the source's
    categories, so every shard has the same ones.
    """
    if not 0.0 <= thinning_low <= thinning_high <= 1.0:
        raise ValueError("need 0 <= thinning_low <= thinning_high <= 1")
    if n_cells < 0 or n_shards < 1:
        raise ValueError("n_cells must be >= 0 and n_shards >= 1")
    source = ad.read_h5ad(source_h5ad)
    if source.n_obs == 0 and n_cells > 0:
        raise ValueError(f"{source_h5ad}: no cells to resample")
    x_source = sp.csr_matrix(source.X)
    if x_source.dtype != np.int32:
        data = np.asarray(x_source.data)
        if data.size and not np.array_equal(data, np.round(data)):
            raise ValueError(f"{source_h5ad}: X does not hold integer counts")
        x_source = sp.csr_matrix(
            (data.astype(np.int32), x_source.indices, x_source.indptr), shape=x_source.shape
        )
    columns = list(source.obs.columns) if obs_columns is None else list(obs_columns)
    missing = [c for c in columns if c not in source.obs.columns]
    if missing:
        raise ValueError(f"{source_h5ad}: obs has no column(s) {missing}")
    obs_source = source.obs[columns]
    var = source.var.copy()
    del source

    os.makedirs(output_dir, exist_ok=True)
    source_name = os.path.splitext(os.path.basename(source_h5ad))[0]
    shard_width = max(3, len(str(n_shards - 1)))
    paths: list[str] = []
    first_cell = 0
    for s, (n_shard, shard_seq) in enumerate(
        zip(_shard_sizes(n_cells, n_shards), np.random.SeedSequence(seed).spawn(n_shards))
    ):
        rng = np.random.default_rng(shard_seq)
        source_n = rng.integers(0, x_source.shape[0], size=n_shard) if n_shard else np.zeros(0, dtype=np.int64)
        fraction_n = rng.uniform(thinning_low, thinning_high, size=n_shard)
        x_ng = thin_counts(x_source[source_n], fraction_n, rng)
        obs = obs_source.iloc[source_n].copy()
        obs.index = pd.Index([f"{source_name}-r{first_cell + i}" for i in range(n_shard)])
        adata = ad.AnnData(X=x_ng, obs=obs, var=var.copy())
        path = os.path.join(output_dir, f"shard_{s:0{shard_width}d}.h5ad")
        _write_shard(adata, path)
        paths.append(path)
        first_cell += n_shard
    return paths
