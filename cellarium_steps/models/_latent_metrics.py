"""scVI's validation metrics on the latent means: a cell type classifier and the ontology Spearman.

Per validation epoch, :class:`ValidationState` keeps two reservoir samples of labelled latent means
(the classifier's training and test cells) and each cell type's latent sum; at the epoch's end
:func:`cell_type_metrics` gathers them over the ranks, fits :func:`fit_logistic_regression` and
scores it, and computes :func:`ontology_spearman` of the type centroids.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cellarium_steps.models._reservoir import ReservoirSampler

if TYPE_CHECKING:
    import pandas as pd

#: the validation classifier: multinomial logistic regression on standardised latent means, fitted by L-BFGS.
CLASSIFIER_MAX_ITER = 200
CLASSIFIER_L2 = 1e-3


class Reservoir:
    """A uniform sample of at most ``size`` rows of latents and labels, the rows chosen by a :class:`ReservoirSampler`.

    After ``seen`` rows, every row seen so far is in the sample with probability ``size / seen``.
    """

    def __init__(self, size: int, n_features: int, generator: torch.Generator) -> None:
        self.size = int(size)
        # The sampler draws with numpy, seeded from the torch generator: one generator seeds several reservoirs.
        self.sampler = ReservoirSampler(self.size, int(torch.randint(0, 2**62, (1,), generator=generator)))
        self.z_rk = torch.zeros(self.size, n_features)
        self.y_r = torch.zeros(self.size, dtype=torch.long)

    @property
    def seen(self) -> int:
        return self.sampler.seen

    @property
    def fill(self) -> int:
        return self.sampler.fill

    def add(self, z_nk: torch.Tensor, y_n: torch.Tensor) -> None:
        rows_m, slots_m = self.sampler.offer(z_nk.shape[0])
        if rows_m.size:
            rows, slots = torch.from_numpy(rows_m), torch.from_numpy(slots_m)
            self.z_rk[slots] = z_nk.detach().float().cpu()[rows]
            self.y_r[slots] = y_n.detach().long().cpu()[rows]

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.z_rk[: self.fill], self.y_r[: self.fill]


class ValidationState:
    """What one validation epoch accumulates: the two reservoirs and per-type latent sums."""

    def __init__(self, n_types: int, n_latent: int, reservoir_size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.train = Reservoir(reservoir_size, n_latent, generator)
        self.test = Reservoir(reservoir_size, n_latent, generator)
        self.z_sum_ck = torch.zeros(n_types, n_latent, dtype=torch.float64)
        self.count_c = torch.zeros(n_types, dtype=torch.float64)

    def add(self, z_nk: torch.Tensor, cell_type_index_n: torch.Tensor, train: bool) -> None:
        """The labelled cells' latent means (index -1: unlabelled) to the train or test reservoir and the sums."""
        codes_n = torch.as_tensor(cell_type_index_n).reshape(-1).long().cpu()
        n_types = self.count_c.shape[0]
        bad_n = (codes_n < -1) | (codes_n >= n_types)
        if bool(bad_n.any()):
            i = int(torch.nonzero(bad_n)[0, 0])
            raise ValueError(
                f"validation_cell_type_index_n: {int(codes_n[i])} (cell {i} of the minibatch) is outside "
                f"[-1, {n_types}) for {n_types} cell_type_categories"
            )
        labelled_n = codes_n >= 0
        z_mk = z_nk.detach().float().cpu()[labelled_n]
        y_m = codes_n[labelled_n]
        (self.train if train else self.test).add(z_mk, y_m)
        self.z_sum_ck.index_add_(0, y_m, z_mk.double())
        self.count_c.index_add_(0, y_m, torch.ones(y_m.shape[0], dtype=torch.float64))


def cell_type_metrics(state: ValidationState, distance_cc: torch.Tensor | None, world_size: int) -> dict[str, float]:
    """``val_cell_type_classifier_accuracy`` and ``val_ontology_spearman`` of an epoch's state (NaN if undefined).

    With ``world_size > 1`` (and a process group) the ranks' reservoirs and centroid sums are
    gathered first, so every rank fits the same classifier on the union of the reservoirs and
    gets the same numbers.
    """
    n_types = state.count_c.shape[0]
    train_z, train_y = state.train.rows()
    test_z, test_y = state.test.rows()
    z_sum_ck, count_c = state.z_sum_ck, state.count_c
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        train_z, train_y = _gather_rows(train_z, train_y, state.train.size)
        test_z, test_y = _gather_rows(test_z, test_y, state.test.size)
        device = _collective_device()
        z_sum_ck, count_c = z_sum_ck.to(device), count_c.to(device)
        for t in (z_sum_ck, count_c):
            torch.distributed.all_reduce(t)
        z_sum_ck, count_c = z_sum_ck.cpu(), count_c.cpu()
    metrics = {"val_cell_type_classifier_accuracy": math.nan, "val_ontology_spearman": math.nan}
    if train_y.numel() and test_y.numel() and int(torch.unique(train_y).numel()) >= 2:
        predict_proba = fit_logistic_regression(train_z, train_y, n_types)
        accuracy = (predict_proba(test_z).argmax(-1) == test_y).double().mean()
        metrics["val_cell_type_classifier_accuracy"] = float(accuracy)
    if distance_cc is not None:
        metrics["val_ontology_spearman"] = ontology_spearman(z_sum_ck, count_c, distance_cc)
    return metrics


def fit_logistic_regression(
    z_nk: torch.Tensor, y_n: torch.Tensor, n_classes: int, max_iter: int = CLASSIFIER_MAX_ITER,
    l2: float = CLASSIFIER_L2,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression, returning a function from latents to class probabilities.

    Features are standardised with the training rows' mean and standard deviation; the weights
    (not the biases) get an L2 penalty ``l2 * ||W||^2 / 2``; L-BFGS with a strong-Wolfe line search
    minimises the mean cross-entropy. Deterministic (zero start). Classes absent from ``y_n`` get
    probability ~0.
    """
    with torch.inference_mode(False), torch.enable_grad():
        z_nk = z_nk.detach().double().clone()
        y_n = y_n.detach().long().clone()
        mean_k = z_nk.mean(0)
        std_k = z_nk.std(0, unbiased=False).clamp_min(1e-6)
        x_nk = (z_nk - mean_k) / std_k
        weight_kc = torch.zeros(x_nk.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
        bias_c = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        absent_c = torch.bincount(y_n, minlength=n_classes) == 0
        optimizer = torch.optim.LBFGS([weight_kc, bias_c], max_iter=max_iter, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-7, tolerance_change=1e-10)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits_nc = (x_nk @ weight_kc + bias_c).masked_fill(absent_c, -1e4)
            loss = nn.functional.cross_entropy(logits_nc, y_n) + 0.5 * l2 * weight_kc.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    weight_kc, bias_c = weight_kc.detach(), bias_c.detach()

    def predict_proba(z_mk: torch.Tensor) -> torch.Tensor:
        logits_mc = ((z_mk.double() - mean_k) / std_k) @ weight_kc + bias_c
        return torch.softmax(logits_mc.masked_fill(absent_c, -1e4), dim=-1)

    return predict_proba


def _average_ranks(values_m: torch.Tensor) -> torch.Tensor:
    """Ranks 0..m-1, ties sharing their average rank (as scipy.stats.rankdata - 1)."""
    order = torch.argsort(values_m, stable=True)
    sorted_m = values_m[order]
    ranks_m = torch.empty_like(values_m, dtype=torch.float64)
    m = values_m.numel()
    start = 0
    while start < m:
        end = start + 1
        while end < m and sorted_m[end] == sorted_m[start]:
            end += 1
        ranks_m[order[start:end]] = (start + end - 1) / 2.0
        start = end
    return ranks_m


def spearman_correlation(a_m: torch.Tensor, b_m: torch.Tensor) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN when either side is constant."""
    ra_m, rb_m = _average_ranks(a_m.double()), _average_ranks(b_m.double())
    ra_m, rb_m = ra_m - ra_m.mean(), rb_m - rb_m.mean()
    denominator = float(ra_m.norm() * rb_m.norm())
    return float((ra_m * rb_m).sum()) / denominator if denominator > 0 else math.nan


def ontology_spearman(z_sum_ck: torch.Tensor, count_c: torch.Tensor, distance_cc: torch.Tensor) -> float:
    """Frequency-weighted Spearman correlation between latent and ontology distances of the cell types.

    Each cell type present (``count_c > 0``) has a latent centroid. For each such type ``c``, rho_c is
    Spearman's correlation, over the other present types ``d`` with a finite ontology distance, between
    the centroid distance ``|mu_c - mu_d|`` and the ontology distance ``D[c, d]``: 1 when the latent
    space orders the other types as the ontology does, as seen from ``c``. The result is the mean of
    rho_c weighted by ``count_c``, over the types where rho_c is defined (at least two others, neither
    side constant); NaN when none is.
    """
    present = torch.nonzero(count_c > 0).flatten()
    if present.numel() < 3:
        return math.nan
    centroid_pk = (z_sum_ck[present] / count_c[present, None]).double()
    latent_pp = torch.cdist(centroid_pk, centroid_pk)
    ontology_pp = distance_cc[present][:, present].double().cpu()
    total, weight = 0.0, 0.0
    for i in range(present.numel()):
        others = torch.ones(present.numel(), dtype=torch.bool)
        others[i] = False
        others &= torch.isfinite(ontology_pp[i])
        if int(others.sum()) < 2:
            continue
        rho = spearman_correlation(latent_pp[i, others], ontology_pp[i, others])
        if math.isnan(rho):
            continue
        w = float(count_c[present[i]])
        total += w * rho
        weight += w
    return total / weight if weight > 0 else math.nan


def _collective_device() -> torch.device:
    """Where tensors must live for the process group's collectives (CUDA for nccl)."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _gather_rows(z_rk: torch.Tensor, y_r: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's reservoir rows, concatenated in rank order (padded to ``size`` for the collective)."""
    import torch.distributed as dist

    world_size = dist.get_world_size()
    device = _collective_device()
    fill = torch.tensor([z_rk.shape[0]], device=device)
    padded_z = torch.zeros(size, z_rk.shape[1], device=device)
    padded_z[: z_rk.shape[0]] = z_rk.to(device)
    padded_y = torch.zeros(size, dtype=torch.long, device=device)
    padded_y[: y_r.shape[0]] = y_r.to(device)
    fills = [torch.zeros_like(fill) for _ in range(world_size)]
    zs = [torch.zeros_like(padded_z) for _ in range(world_size)]
    ys = [torch.zeros_like(padded_y) for _ in range(world_size)]
    dist.all_gather(fills, fill)
    dist.all_gather(zs, padded_z)
    dist.all_gather(ys, padded_y)
    n = [int(f) for f in fills]
    return (torch.cat([z[:m] for z, m in zip(zs, n)]).cpu(), torch.cat([y[:m] for y, m in zip(ys, n)]).cpu())


def ordered_distance_matrix(matrix: pd.DataFrame, categories: Sequence[str]) -> torch.Tensor:
    """``matrix`` restricted and reordered to ``categories`` on both axes, as a float64 tensor."""
    import pandas as pd

    if not isinstance(matrix, pd.DataFrame):
        raise TypeError("ontology_distance_matrix must be a pandas DataFrame indexed by cell type ids on both axes")
    missing = [c for c in categories if c not in matrix.index or c not in matrix.columns]
    if missing:
        raise ValueError(f"ontology_distance_matrix has no row or column for {missing[:5]}")
    values = matrix.loc[list(categories), list(categories)].to_numpy(dtype=np.float64)
    return torch.from_numpy(values.copy())


# -- reference mapping: label transfer and mixing by nearest neighbours ----------------------------------------


def nearest_neighbours(z_nk: torch.Tensor, pool_mk: torch.Tensor, k: int, *, exclude_self: bool = False,
                       chunk: int = 2048) -> torch.Tensor:
    """Indices (n, k) of each row's ``k`` nearest rows of ``pool_mk`` (Euclidean), nearest first.

    With ``exclude_self`` the rows are the pool's first n rows and a row is not its own neighbour.
    Distances are computed ``chunk`` rows at a time, so memory is ``chunk x m``.
    """
    z_nk, pool_mk = torch.as_tensor(z_nk, dtype=torch.float32), torch.as_tensor(pool_mk, dtype=torch.float32)
    if k > pool_mk.shape[0] - int(exclude_self):
        raise ValueError(f"k={k} neighbours asked of a pool of {pool_mk.shape[0]} rows")
    parts = []
    for start in range(0, z_nk.shape[0], chunk):
        distance_cm = torch.cdist(z_nk[start:start + chunk], pool_mk)
        if exclude_self:
            rows = torch.arange(distance_cm.shape[0])
            distance_cm[rows, start + rows] = torch.inf
        parts.append(distance_cm.topk(k, dim=1, largest=False).indices)
    return torch.cat(parts) if parts else torch.zeros(0, k, dtype=torch.long)


def knn_label_transfer(reference_z_mk: torch.Tensor, reference_code_m: torch.Tensor, query_z_nk: torch.Tensor,
                       k: int = 15) -> torch.Tensor:
    """Each query cell's label (code) by a majority vote of its ``k`` nearest reference cells; ties go to
    the smallest code (as scikit-learn's ``KNeighborsClassifier``)."""
    reference_code_m = torch.as_tensor(reference_code_m, dtype=torch.long)
    neighbour_code_nk = reference_code_m[nearest_neighbours(query_z_nk, reference_z_mk, k)]
    n_codes = int(reference_code_m.max()) + 1
    votes_nc = torch.zeros(neighbour_code_nk.shape[0], n_codes).scatter_add_(
        1, neighbour_code_nk, torch.ones_like(neighbour_code_nk, dtype=torch.float32))
    return votes_nc.argmax(dim=1)


def reference_neighbour_fraction(reference_z_mk: torch.Tensor, query_z_nk: torch.Tensor, k: int = 15) -> float:
    """Mixing of a mapped query: for each query cell, the fraction of its ``k`` nearest neighbours among all
    cells (reference and query, itself excluded) that are reference cells, averaged over the query cells.
    Well mixed is the reference's share of the cells; 0 is a query apart from the reference."""
    query_z_nk = torch.as_tensor(query_z_nk, dtype=torch.float32)
    pool = torch.cat([query_z_nk, torch.as_tensor(reference_z_mk, dtype=torch.float32)])
    neighbour_nk = nearest_neighbours(query_z_nk, pool, k, exclude_self=True)
    return float((neighbour_nk >= query_z_nk.shape[0]).float().mean())


def mapping_metrics(reference_z_mk: np.ndarray, reference_labels_m: np.ndarray, query_z_nk: np.ndarray,
                    query_labels_n: np.ndarray, k: int = 15) -> dict[str, float]:
    """How well a query is mapped onto a reference, from the latent means of both.

    ``accuracy``: a ``k``-NN vote of the labelled reference cells gives each labelled query cell a
    reference label, right when it is the query's label or one of its descendants (labels are Cell
    Ontology ids, possibly at other depths on the two sides); ``mixing``:
    :func:`reference_neighbour_fraction` over every cell; ``n_scored``: the labelled query cells.
    """
    from cellarium_steps.ontology import is_term_or_descendant, is_unlabelled

    reference_labels_m, query_labels_n = np.asarray(reference_labels_m), np.asarray(query_labels_n)
    voters = np.array([not is_unlabelled(v) for v in reference_labels_m], dtype=bool)
    scored = np.array([not is_unlabelled(v) for v in query_labels_n], dtype=bool)
    classes, codes = np.unique(reference_labels_m[voters].astype(str), return_inverse=True)
    predicted = classes[knn_label_transfer(torch.as_tensor(reference_z_mk[voters]), torch.as_tensor(codes),
                                           torch.as_tensor(query_z_nk[scored]), k).numpy()]
    return {
        "accuracy": float(np.mean(is_term_or_descendant(predicted, query_labels_n[scored].astype(str)))),
        "mixing": reference_neighbour_fraction(torch.as_tensor(reference_z_mk), torch.as_tensor(query_z_nk), k),
        "n_scored": int(scored.sum()),
    }
