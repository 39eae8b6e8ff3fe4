"""Cell-type annotation quality: SOCAM against scikit-learn's LogisticRegression, leave one source out.

On the merged PBMC file (``../shared/data/pbmc_multibatch_15493x7152_raw.h5ad``), for each source
that has labelled cells: train on every other source's cells (their labelled cells supervise; the
'unknown' ones stream through masked, as in ``train-socam``), predict the held-out source's
labelled cells, and score

* ``depth``: accuracy at the labelled depth: a prediction is right when it is the label or one of
  its descendants (a cell labelled CD4 T and called naive CD4 T is right; called T cell, not);
* ``coarse``: accuracy after mapping label and prediction to T / B / NK / mononuclear phagocyte by
  their Cell Ontology ancestors (a prediction with none of them, e.g. a broader term, is wrong);
* ``violations``: cells x (parent, child) pairs where SOCAM's propagated probability of the child
  exceeds the parent's (by more than 1e-6): hierarchical consistency, must be 0.

Features, the same for both: our ``hvg`` step (seurat_v3, 2,000 genes, ``--batch-key source``) on
*all* cells of the file (unsupervised: no labels are read, but the held-out source's expression is
among the cells it ranks), then normalize_total(1e4) and log1p, in memory.

SOCAM is trained with ``train-socam``'s defaults (prior scale, learning rate, epochs, batch size,
initialisation) through our Python API on in-memory minibatches shuffled per epoch; its call is the
one ``predict`` writes (the most specific term with propagated probability >= 0.5). scikit-learn:
``LogisticRegression()`` defaults (L2, C=1, lbfgs) with ``max_iter=1000``, its ``predict``.

    .venv/bin/python benchmarks/bench_celltype.py [--epochs N] [--seed S]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OUT_DIR, cellarium_steps_exe, print_table, source_h5ad

LABEL_KEY = "cell_type_ontology_term_id"
SOURCE_KEY = "source"
#: the coarse classes and the CL term each is recognised by among a term's ancestors (itself included)
COARSE = {"T": "CL:0000084", "B": "CL:0000236", "NK": "CL:0000623", "monocyte/phagocyte": "CL:0000113"}
N_HVG = 2000


def hvg_genes(path: Path) -> list[str]:
    import pandas as pd

    out = OUT_DIR / "celltype" / f"hvg_{N_HVG}_source.csv"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([cellarium_steps_exe(), "hvg", "--input", str(path), "--batch-key", SOURCE_KEY,
                        "--n-top-genes", str(N_HVG), "--output", str(out), "--quiet"], check=True)
    table = pd.read_csv(out)
    return table.loc[table["highly_variable"], "gene"].astype(str).tolist()


def features(adata, genes: list[str]) -> np.ndarray:
    import scipy.sparse as sp

    x = sp.csr_matrix(adata.X).astype(np.float64)
    total = np.asarray(x.sum(axis=1)).ravel()
    x = sp.csr_matrix(sp.diags(1e4 / np.maximum(total, 1e-12)) @ x)
    x.data = np.log1p(x.data)
    return x[:, adata.var_names.get_indexer(genes)].toarray().astype(np.float32)


def socam_defaults():
    """train-socam's option defaults."""
    from cellarium_steps.pipelines.labels import SOCAM_W_PRIOR_SCALE, LabelTrainingOptions

    return LabelTrainingOptions(inputs=["x.h5ad"], output="x.ckpt", w_prior_scale=SOCAM_W_PRIOR_SCALE)


def train_socam(x_ng: np.ndarray, labels_n: np.ndarray, genes: list[str], defaults,
                epochs: int, seed: int):
    """SOCAM over the training cells' label terms, as train-socam builds it, trained on minibatches."""
    import torch

    from cellarium_steps.models.socam import SOCAM
    from cellarium_steps.ontology import descendant_tensor, is_unlabelled
    from cellarium_steps.pipelines.labels import W_INIT_SCALE

    labelled = np.array([not is_unlabelled(v) for v in labels_n])
    terms = sorted(set(labels_n[labelled]))
    model = SOCAM(n_obs=int(labelled.sum()), var_names_g=np.array(genes), descendant_tensor=descendant_tensor(terms),
                  cl_names=terms, cl_name_subset=terms, probability_propagation_flag=True,
                  W_prior_scale=defaults.w_prior_scale, W_init_scale=W_INIT_SCALE, seed=seed, log_metrics=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=defaults.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.from_numpy(x_ng)
    labels_n = labels_n.astype(object)
    var_names = model.var_names_g
    for _ in range(epochs):
        order = torch.randperm(len(labels_n), generator=generator).numpy()
        for start in range(0, len(order), defaults.batch_size):
            rows = order[start : start + defaults.batch_size]
            optimizer.zero_grad()
            model(x_t[rows], var_names, labels_n[rows])["loss"].backward()
            optimizer.step()
    return model


def socam_calls(model, x_ng: np.ndarray) -> tuple[list[str], int]:
    """The calls predict writes, and the number of parent < child violations of the propagated probabilities."""
    import torch

    from cellarium_steps.outputs.prediction_columns import descendant_lists, ontology_call

    probs_nc = model.predict(torch.from_numpy(x_ng), model.var_names_g)["cell_type_probs_nc"].numpy()
    d_cc = model.active_descendant_tensor_cc.numpy()
    call_n = ontology_call(probs_nc, descendant_lists(d_cc))
    parents, children = np.nonzero(d_cc - np.eye(len(d_cc)))
    violations = int((probs_nc[:, parents] < probs_nc[:, children] - 1e-6).sum())
    return [model.active_cl_names[i] for i in call_n], violations


class Scorer:
    def __init__(self) -> None:
        from cellarium_steps.ontology import all_ancestors

        self._all_ancestors = all_ancestors
        self._lineage: dict[str, set[str]] = {}

    def lineage(self, term: str) -> set[str]:
        if term not in self._lineage:
            self._lineage[term] = {term, *self._all_ancestors([term])}
        return self._lineage[term]

    def coarse(self, term: str) -> str | None:
        lineage = self.lineage(term)
        return next((name for name, cl in COARSE.items() if cl in lineage), None)

    def score(self, labels: list[str], predictions: list[str]) -> tuple[int, int]:
        depth = sum(label in self.lineage(pred) for label, pred in zip(labels, predictions))
        coarse = sum(self.coarse(label) is not None and self.coarse(label) == self.coarse(pred)
                     for label, pred in zip(labels, predictions))
        return depth, coarse


def main() -> None:
    import anndata as ad
    import torch
    from sklearn.linear_model import LogisticRegression

    from cellarium_steps.pipelines.labels import default_max_epochs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = socam_defaults()
    parser.add_argument("--epochs", type=int, default=None,
                        help="SOCAM epochs (default: train-socam's for the fold's training cells)")
    parser.add_argument("--w-prior-scale", type=float, default=defaults.w_prior_scale,
                        help=f"SOCAM's Laplace scale (default: train-socam's, {defaults.w_prior_scale:g})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    defaults.w_prior_scale = args.w_prior_scale

    path = source_h5ad()
    adata = ad.read_h5ad(path)
    genes = hvg_genes(path)
    x_ng = features(adata, genes)
    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    sources = adata.obs[SOURCE_KEY].astype(str).to_numpy()
    labelled = labels != "unknown"
    scorer = Scorer()
    print(f"{path.name}: {adata.n_obs:,} cells, {int(labelled.sum()):,} labelled; {len(genes)} HVG genes (our hvg, "
          f"all cells, batch key {SOURCE_KEY}); SOCAM: w_prior_scale={defaults.w_prior_scale:g}, "
          f"lr={defaults.learning_rate:g}, epochs={args.epochs or 'train-socam default per fold'}, batch {defaults.batch_size}", file=sys.stderr)

    rows, totals = [], {"n": 0, "socam_depth": 0, "socam_coarse": 0, "sklearn_depth": 0, "sklearn_coarse": 0,
                        "violations": 0, "socam_s": 0.0, "sklearn_s": 0.0}
    for held in sorted(set(sources[labelled])):
        train = sources != held
        test = labelled & (sources == held)
        start = time.perf_counter()
        epochs = args.epochs or default_max_epochs(int(train.sum()), defaults.batch_size)
        model = train_socam(x_ng[train], labels[train], genes, defaults, epochs, args.seed)
        socam_pred, violations = socam_calls(model, x_ng[test])
        socam_s = time.perf_counter() - start
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = LogisticRegression(max_iter=1000).fit(x_ng[train & labelled], labels[train & labelled])
        sklearn_pred = reference.predict(x_ng[test]).tolist()
        sklearn_s = time.perf_counter() - start
        truth = labels[test].tolist()
        socam_depth, socam_coarse = scorer.score(truth, socam_pred)
        sklearn_depth, sklearn_coarse = scorer.score(truth, sklearn_pred)
        n = len(truth)
        rows.append({
            "held-out source": held, "cells": n, "SOCAM epochs": epochs,
            "SOCAM depth": socam_depth / n, "sklearn depth": sklearn_depth / n,
            "SOCAM coarse": socam_coarse / n, "sklearn coarse": sklearn_coarse / n,
            "violations": violations, "SOCAM s": socam_s, "sklearn s": sklearn_s,
        })
        for key, value in (("n", n), ("socam_depth", socam_depth), ("socam_coarse", socam_coarse),
                           ("sklearn_depth", sklearn_depth), ("sklearn_coarse", sklearn_coarse),
                           ("violations", violations), ("socam_s", socam_s), ("sklearn_s", sklearn_s)):
            totals[key] += value
        print(f"[bench] {held}: done", file=sys.stderr, flush=True)
    n = totals["n"]
    rows.append({
        "held-out source": "overall (pooled)", "cells": n,
        "SOCAM depth": totals["socam_depth"] / n, "sklearn depth": totals["sklearn_depth"] / n,
        "SOCAM coarse": totals["socam_coarse"] / n, "sklearn coarse": totals["sklearn_coarse"] / n,
        "violations": totals["violations"], "SOCAM s": totals["socam_s"], "sklearn s": totals["sklearn_s"],
    })
    for row in rows:
        for key in ("SOCAM depth", "sklearn depth", "SOCAM coarse", "sklearn coarse"):
            row[key] = round(100 * row[key], 1)
    print_table(rows)


if __name__ == "__main__":
    main()
