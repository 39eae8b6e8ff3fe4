"""The report step's plots, the ones a user looks at first, as PNGs for `snakemake --report`."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable

import numpy as np
import pandas as pd

from cellarium_steps.atomic import atomic_path, write_json_atomically
from cellarium_steps.data.errors import InputError
from cellarium_steps.models._reservoir import ReservoirSampler
from cellarium_steps.outputs.layout import PCALayout, vector_matrix

logger = logging.getLogger("cellarium_steps")

PLOTS = {
    "hvg_mean_variance.png": "--hvg",
    "pca_variance.png": "--pca-variance",
    "scvi_loss.png": "--scvi-metrics",
    "latent_by_batch.png": "--cells",
    "latent_by_cell_type.png": "--cells",
    "cell_type_composition.png": "--cells",
}
#: the query report (``--query-cells``): a mapped query beside its reference
QUERY_PLOTS = {
    "query_latent_by_dataset.png": "reference and query cells in the mapped latent",
    "query_latent_by_cell_type.png": "the same cells by predicted cell type",
    "query_cell_type_composition.png": "predicted cell types per query batch",
}
MAX_LEGEND = 12
#: neighbours of the mixing number in the query report's title
MIXING_NEIGHBOURS = 15


# -- figures ------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _save(fig, path: str) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    _pyplot().close(fig)


def _placeholder(path: str, title: str, message: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes)
    _save(fig, path)


def _read_csv(path: str, flag: str, columns: tuple[str, ...]) -> pd.DataFrame:
    if not os.path.isfile(path):
        raise InputError(f"{flag}: {path}: no such file")
    table = pd.read_csv(path)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{flag}: {path}: no column(s) {missing} (columns: {list(table.columns)})")
    return table


def plot_hvg(path: str, out: str) -> None:
    table = _read_csv(path, "--hvg", ("means", "variances", "highly_variable"))
    hv = table["highly_variable"].astype(str).str.lower().isin(("true", "1")).to_numpy()
    keep = (table["means"] > 0).to_numpy() & (table["variances"] > 0).to_numpy()
    mean = np.log10(table["means"].to_numpy()[keep])
    plt = _pyplot()
    panels = [("variances", "log10 variance")]
    if "variances_norm" in table.columns:
        panels.append(("variances_norm", "normalised variance (Seurat v3)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (column, label) in zip(axes[0], panels):
        y = table[column].to_numpy()[keep]
        y = np.log10(y) if column == "variances" else y
        sel = hv[keep]
        ax.scatter(mean[~sel], y[~sel], s=3, c="lightgrey", label=f"other ({(~sel).sum()})", rasterized=True)
        ax.scatter(mean[sel], y[sel], s=4, c="crimson", label=f"highly variable ({sel.sum()})", rasterized=True)
        ax.set_xlabel("log10 mean count")
        ax.set_ylabel(label)
        ax.legend(loc="upper left", frameon=False, markerscale=3)
    fig.suptitle(f"Highly variable genes: {int(hv.sum())} of {len(table)}")
    _save(fig, out)


def plot_pca_variance(path: str, out: str) -> None:
    table = _read_csv(path, "--pca-variance", ("component", "explained_variance_ratio"))
    component = np.arange(1, len(table) + 1)
    ratio = table["explained_variance_ratio"].to_numpy()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    (per,) = ax.plot(component, ratio, "o-", ms=3, label="per component")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    twin = ax.twinx()
    (cumulative,) = twin.plot(component, np.cumsum(ratio), color="grey", ls="--", label="cumulative")
    twin.set_ylabel("cumulative ratio")
    twin.set_ylim(0, 1.02)
    ax.set_title(f"PCA: {len(ratio)} components explain {100 * ratio.sum():.1f}% of the HVG variance")
    ax.legend(handles=[per, cumulative], loc="upper right", frameon=False)
    _save(fig, out)


def plot_losses(path: str, out: str) -> None:
    table = _read_csv(path, "--scvi-metrics", ("epoch",))
    curves = [c for c in ("train_loss", "val_loss") if c in table.columns and table[c].notna().any()]
    if not curves:
        _placeholder(out, "scVI loss", f"{path} has no loss values")
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, label in (("train_loss", "training"), ("val_loss", "validation")):
        if column in curves:
            ax.plot(table["epoch"] + 1, table[column], "o-", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("loss per cell (negative ELBO)")
    ax.set_title("scVI training" + ("" if "val_loss" in curves else " (no validation cells: train-scvi --val-fraction)"))
    ax.legend(frameon=False)
    _save(fig, out)


# -- per-cell data: one streaming pass ---------------------------------------------------------------------


class CellSample:
    """A uniform reservoir sample of cells (:class:`ReservoirSampler`), and exact cell-type counts per batch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.sampler = ReservoirSampler(size, seed)
        self.latent: np.ndarray | None = None
        self.batch = np.empty(0, dtype=object)
        self.cell_type = np.empty(0, dtype=object)
        self.counts: Counter[tuple[str, str]] = Counter()

    @property
    def seen(self) -> int:
        return self.sampler.seen

    def add(self, latent: np.ndarray, batch: np.ndarray, cell_type: np.ndarray) -> None:
        self.counts.update(zip(batch.tolist(), cell_type.tolist()))
        if self.latent is None:
            self.latent = np.empty((0, latent.shape[1]), dtype=np.float32)
        rows, slots = self.sampler.offer(len(batch))
        # Slots past the sample's end come in slot order: those rows are appended, the others overwrite.
        new = slots >= len(self.batch)
        stored = []
        for sample, arriving in ((self.latent, latent), (self.batch, batch), (self.cell_type, cell_type)):
            if new.any():
                sample = np.concatenate([sample, arriving[rows[new]]])
            sample[slots[~new]] = arriving[rows[~new]]
            stored.append(sample)
        self.latent, self.batch, self.cell_type = stored


def _cell_type_column(names: list[str]) -> str | None:
    for column in ("cell_type", "cell_type_ontology_term_id"):
        if column in names:
            return column
    return None


def sample_cells(path: str, latent_column: str, size: int, seed: int) -> tuple[CellSample, str | None]:
    import pyarrow as pa
    import pyarrow.dataset as ds

    if not os.path.isdir(path):
        raise InputError(f"--cells: {path}: no such directory")
    partitioning = ds.partitioning(pa.schema([("dataset", pa.string()), ("batch", pa.string())]), flavor="hive")
    dataset = ds.dataset(path, format="parquet", partitioning=partitioning)
    names = dataset.schema.names
    if latent_column not in names:
        raise InputError(f"--cells: {path}: no column {latent_column!r} (columns: {names})")
    type_column = _cell_type_column(names)
    columns = [latent_column, "batch"] + ([type_column] if type_column else [])
    sample = CellSample(size, seed)
    for batch in dataset.to_batches(columns=columns, batch_size=65_536):
        if batch.num_rows == 0:
            continue
        latent = vector_matrix(batch.column(latent_column))
        batches = np.asarray(batch.column("batch").fill_null("(none)").to_numpy(zero_copy_only=False), dtype=object)
        types = (np.asarray(batch.column(type_column).fill_null("(none)").to_numpy(zero_copy_only=False), dtype=object)
                 if type_column else np.full(batch.num_rows, "(not predicted)", dtype=object))
        sample.add(latent, batches, types)
    if sample.seen == 0:
        raise InputError(f"--cells: {path}: no cells")
    return sample, type_column


def layout_2d(latent: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, tuple[str, str]]:
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise InputError("--layout umap needs umap-learn (pip install umap-learn), or use --layout pca") from None
        xy = umap.UMAP(n_components=2, random_state=seed).fit_transform(latent)
        return np.asarray(xy), ("UMAP 1", "UMAP 2")
    return PCALayout(latent).transform(latent), ("latent PC 1", "latent PC 2")


def _ordered_categories(values: np.ndarray, limit: int = MAX_LEGEND) -> list[str]:
    counts = Counter(values.tolist())
    return [c for c, _ in counts.most_common(limit)]


def plot_scatter(xy: np.ndarray, labels: np.ndarray, axis_names: tuple[str, str], title: str, out: str,
                 *, sort_legend: bool = False) -> None:
    plt = _pyplot()
    shown = _ordered_categories(labels)
    shown = sorted(shown) if sort_legend else shown
    labels = np.where(np.isin(labels, shown), labels, "other")
    order = np.random.default_rng(0).permutation(len(labels))  # no category painted over the others
    categories = shown + (["other"] if (labels == "other").any() else [])
    colours = {c: plt.get_cmap("tab20" if len(categories) > 10 else "tab10")(i) for i, c in enumerate(categories)}
    colours["other"] = (0.75, 0.75, 0.75, 1.0)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    ax.scatter(xy[order, 0], xy[order, 1], s=3, c=[colours[c] for c in labels[order]], rasterized=True, linewidths=0)
    for c in categories:
        ax.scatter([], [], s=20, color=colours[c], label=c)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    _save(fig, out)


def plot_composition(counts: Counter, title_suffix: str, out: str) -> None:
    table = pd.Series(counts).unstack(fill_value=0) if counts else pd.DataFrame()
    plt = _pyplot()
    shown = table.sum(axis=0).sort_values(ascending=False).index[:MAX_LEGEND].tolist()
    if len(shown) < table.shape[1]:
        table = table[shown].assign(other=table.drop(columns=shown).sum(axis=1))
    else:
        table = table[shown]
    fractions = table.div(table.sum(axis=1), axis=0)
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(table) + 3), 4.5))
    bottom = np.zeros(len(table))
    cmap = plt.get_cmap("tab20" if table.shape[1] > 10 else "tab10")
    for i, column in enumerate(fractions.columns):
        colour = (0.75, 0.75, 0.75, 1.0) if column == "other" else cmap(i)
        ax.bar(range(len(table)), fractions[column], bottom=bottom, color=colour, label=column, width=0.8)
        bottom += fractions[column].to_numpy()
    ax.set_xticks(range(len(table)))
    ax.set_xticklabels([f"{b}\n(n={n:,})" for b, n in zip(table.index, table.sum(axis=1))], rotation=45, ha="right",
                       fontsize=8)
    ax.set_ylabel("fraction of cells")
    ax.set_ylim(0, 1)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    ax.set_title(f"Cell types per batch{title_suffix}")
    _save(fig, out)


def plot_cells(output: str, cells: str, *, latent_column: str, sample_size: int, layout: str, seed: int) -> None:
    paths = {name: os.path.join(output, name) for name in PLOTS}
    sample, type_column = sample_cells(cells, latent_column, sample_size, seed)
    xy, axis_names = layout_2d(sample.latent, layout, seed)
    n = f"{len(sample.batch):,} of {sample.seen:,} cells"
    plot_scatter(xy, sample.batch, axis_names, f"{latent_column} by batch ({n})", paths["latent_by_batch.png"],
                 sort_legend=True)
    if type_column is None:
        message = "the export has no predicted cell types (set cell_type_key to train SOCAM)"
        _placeholder(paths["latent_by_cell_type.png"], "Predicted cell type", message)
    else:
        plot_scatter(xy, sample.cell_type, axis_names, f"{latent_column} by predicted {type_column} ({n})",
                     paths["latent_by_cell_type.png"])
    plot_composition(sample.counts, f" (predicted {type_column}, all {sample.seen:,} cells)" if type_column else
                     " (no predictions)", paths["cell_type_composition.png"])


def _same_rate(reference: CellSample, query: CellSample, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of each sample such that both keep the same fraction of their cells (the smaller one's), so
    that neighbour counts between them mean what they would on every cell."""
    rate = min(len(reference.batch) / reference.seen, len(query.batch) / query.seen)
    rng = np.random.default_rng(seed)

    def rows(sample: CellSample) -> np.ndarray:
        return np.sort(rng.choice(len(sample.batch), max(1, round(rate * sample.seen)), replace=False))

    return rows(reference), rows(query)


def plot_query(output: str, cells: str, query_cells: str, *, latent_column: str, sample_size: int, layout: str,
               seed: int) -> None:
    """:data:`QUERY_PLOTS`: the reference's and the query's cells (uniform samples at the same rate) in one
    2-D layout of the mapped latent, by dataset and by predicted type, and the query's predicted types per
    batch (every query cell); the title gives the query's mixing with the reference."""
    from cellarium_steps.models._latent_metrics import reference_neighbour_fraction

    reference, type_column = sample_cells(cells, latent_column, sample_size, seed)
    query, query_type_column = sample_cells(query_cells, latent_column, sample_size, seed + 1)
    rows_r, rows_q = _same_rate(reference, query, seed)
    latent = np.concatenate([reference.latent[rows_r], query.latent[rows_q]])
    dataset = np.array(["reference"] * len(rows_r) + ["query"] * len(rows_q), dtype=object)
    cell_type = np.concatenate([reference.cell_type[rows_r], query.cell_type[rows_q]])
    xy, axis_names = layout_2d(latent, layout, seed)
    k = min(MIXING_NEIGHBOURS, len(latent) - 1)
    mixing = reference_neighbour_fraction(reference.latent[rows_r], query.latent[rows_q], k) if k >= 1 else float("nan")
    n = f"{len(rows_r):,} of {reference.seen:,} reference and {len(rows_q):,} of {query.seen:,} query cells"
    plot_scatter(xy, dataset, axis_names, f"{latent_column}: {n}\nquery cells' {k} nearest neighbours: "
                 f"{mixing:.0%} reference (their share of the cells drawn: {len(rows_r) / len(latent):.0%})",
                 os.path.join(output, "query_latent_by_dataset.png"), sort_legend=True)
    column = query_type_column or type_column
    if column is None:
        _placeholder(os.path.join(output, "query_latent_by_cell_type.png"), "Predicted cell type",
                     "neither export has predicted cell types (set cell_type_key to train SOCAM)")
    else:
        plot_scatter(xy, cell_type, axis_names, f"{latent_column} by predicted {column} ({n})",
                     os.path.join(output, "query_latent_by_cell_type.png"))
    plot_composition(query.counts, f" of the query (predicted {query_type_column}, all {query.seen:,} cells)"
                     if query_type_column else " of the query (no predictions)",
                     os.path.join(output, "query_cell_type_composition.png"))


def write_report(
    *, output: str, hvg: str | None = None, pca_variance: str | None = None, scvi_metrics: str | None = None,
    cells: str | None = None, query_cells: str | None = None, latent_column: str = "scvi_latent",
    sample_size: int = 20_000, layout: str = "pca", seed: int = 0, provenance: dict | None = None,
) -> None:
    """Every plot of :data:`PLOTS` in ``output`` (a placeholder image where its input is not given); with
    ``query_cells`` (a mapped query's export) the :data:`QUERY_PLOTS` instead, ``cells`` being the reference's."""
    if sample_size < 1:
        raise InputError(f"--sample-size: must be at least 1, got {sample_size}")
    os.makedirs(output, exist_ok=True)
    if query_cells:
        if not cells:
            raise InputError("--query-cells: give the reference's export as --cells")
        plot_query(output, cells, query_cells, latent_column=latent_column, sample_size=sample_size, layout=layout,
                   seed=seed)
        write_json_atomically(json.dumps(provenance or {}, default=str, sort_keys=True),
                              os.path.join(output, "provenance.json"))
        logger.info("wrote %d plots to %s", len(QUERY_PLOTS), output)
        return
    jobs: list[tuple[str | None, str, Callable[[str, str], None]]] = [
        (hvg, "hvg_mean_variance.png", plot_hvg),
        (pca_variance, "pca_variance.png", plot_pca_variance),
        (scvi_metrics, "scvi_loss.png", plot_losses),
    ]
    for given, name, plot in jobs:
        if given:
            plot(given, os.path.join(output, name))
        else:
            _placeholder(os.path.join(output, name), name, f"not plotted: no {PLOTS[name]} given")
    if cells:
        plot_cells(output, cells, latent_column=latent_column, sample_size=sample_size, layout=layout, seed=seed)
    else:
        for name in ("latent_by_batch.png", "latent_by_cell_type.png", "cell_type_composition.png"):
            _placeholder(os.path.join(output, name), name, "not plotted: no --cells given")
    write_json_atomically(json.dumps(provenance or {}, default=str, sort_keys=True),
                          os.path.join(output, "provenance.json"))
    logger.info("wrote %d plots to %s", len(PLOTS), output)
