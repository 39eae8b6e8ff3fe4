"""An MLP embedding trained with the SimCLR contrastive loss (NT-Xent)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cellarium_steps.models._tensors import densify
from cellarium_steps.models.base import CellariumModel, PredictMixin


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def gather_with_grad(z_nd: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows, concatenated in rank order, with gradients flowing back to each rank; and
    the offset of this rank's rows. Ranks may hold different numbers of rows (they are padded
    for the collective and trimmed after). Without a process group: ``(z_nd, 0)``.
    """
    if not _distributed():
        return z_nd, 0
    from torch.distributed.nn.functional import all_gather

    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    n_local = torch.tensor([z_nd.shape[0]], device=z_nd.device)
    sizes = [torch.zeros_like(n_local) for _ in range(world)]
    torch.distributed.all_gather(sizes, n_local)
    sizes_r = [int(s.item()) for s in sizes]
    n_max = max(sizes_r)
    padded = F.pad(z_nd, (0, 0, 0, n_max - z_nd.shape[0]))
    gathered = all_gather(padded)
    z_all = torch.cat([g[:s] for g, s in zip(gathered, sizes_r)])
    return z_all, sum(sizes_r[:rank])


def nt_xent_loss(z1_nd: torch.Tensor, z2_nd: torch.Tensor, temperature: float = 1.0, gather: bool = True) -> torch.Tensor:
    """Normalized temperature-scaled cross-entropy of SimCLR.

    ``z1_nd[i]`` and ``z2_nd[i]`` are the two views of cell i. For each of the 2n local anchors,
    the positive is its other view and the negatives are every other embedding of both views,
    across all DDP ranks when ``gather`` and a process group is initialised (so the negatives are
    the global batch; each rank's loss covers its own anchors, and since the gather carries
    gradients, DDP's gradient average is the gradient of the global mean loss):

        loss = mean over anchors a of -log( exp(s(a, pos(a)) / t) / sum_{k != a} exp(s(a, k) / t) )

    with ``s`` the cosine similarity.
    """
    if z1_nd.shape != z2_nd.shape:
        raise ValueError(f"the two views differ in shape: {tuple(z1_nd.shape)} vs {tuple(z2_nd.shape)}")
    z1_nd = F.normalize(z1_nd, dim=-1)
    z2_nd = F.normalize(z2_nd, dim=-1)
    n = z1_nd.shape[0]
    if gather:
        z1_all, offset = gather_with_grad(z1_nd)
        z2_all, _ = gather_with_grad(z2_nd)
    else:
        z1_all, z2_all, offset = z1_nd, z2_nd, 0
    n_all = z1_all.shape[0]
    candidates_kd = torch.cat([z1_all, z2_all])  # global index: view 1 at i, view 2 at n_all + i
    anchors_ad = torch.cat([z1_nd, z2_nd])
    local_a = torch.arange(n, device=z1_nd.device) + offset
    self_a = torch.cat([local_a, local_a + n_all])
    positive_a = torch.cat([local_a + n_all, local_a])
    logits_ak = anchors_ad @ candidates_kd.T / temperature
    logits_ak = logits_ak.scatter(1, self_a[:, None], float("-inf"))
    return F.cross_entropy(logits_ak, positive_a)


class ContrastiveMLP(CellariumModel, PredictMixin):
    """Multilayer perceptron trained with contrastive learning.

    The batch ``x_ng`` holds two augmented views of the same cells: the first half of the rows
    is view 1 and the second half view 2, row ``i`` paired with row ``n/2 + i`` (as
    :class:`~cellarium_steps.transforms.augment.DuplicateViews` followed by random augmentations
    makes them, per cellarium-ml). The embeddings are L2-normalised and trained with NT-Xent;
    under DDP the negatives are gathered from every rank (see :func:`nt_xent_loss`).

    Args:
        n_obs: Number of observations in each entry (network input size: the number of genes).
        hidden_size: Dimensionality of the fully-connected hidden layers (Linear, BatchNorm, ReLU each).
        embed_dim: Size of embedding (network output size).
        temperature: Parameter governing Normalized Temperature-scaled cross-entropy (NT-Xent) loss.
    """

    def __init__(self, n_obs: int, hidden_size: Sequence[int], embed_dim: int, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        sizes = [int(n_obs), *[int(h) for h in hidden_size]]
        layers: list[nn.Module] = []
        for size_in, size_out in itertools.pairwise(sizes):
            layers += [nn.Linear(size_in, size_out), nn.BatchNorm1d(size_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], embed_dim))
        self.layers = nn.Sequential(*layers)
        self.n_obs = int(n_obs)
        self.embed_dim = embed_dim
        self.temperature = temperature
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
            elif isinstance(layer, nn.BatchNorm1d):
                layer.reset_parameters()

    def embed(self, x_ng: torch.Tensor) -> torch.Tensor:
        dtype = next((p.dtype for p in self.parameters()), torch.float32)
        x_ng = densify(x_ng).to(dtype)
        if x_ng.shape[1] != self.n_obs:
            raise ValueError(f"x_ng has {x_ng.shape[1]} columns, the model takes {self.n_obs}")
        return F.normalize(self.layers(x_ng), dim=-1)

    def forward(self, x_ng: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            x_ng: Gene counts matrix of 2n rows: view 1 of n cells, then view 2 of the same cells.

        Returns:
            A dictionary with the loss value.
        """
        if x_ng.shape[0] % 2:
            raise ValueError(f"x_ng must hold two views (an even number of rows), got {x_ng.shape[0]} rows")
        z1_nd, z2_nd = torch.chunk(self.embed(x_ng), 2)
        return {"loss": nt_xent_loss(z1_nd, z2_nd, self.temperature)}

    def predict(self, x_ng: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sends (transformed) data through the model and returns outputs.

        Returns:
            A dictionary with the embedding matrix under ``x_ng`` (L2-normalised, (n, embed_dim)).
        """
        with torch.no_grad():
            return {"x_ng": self.embed(x_ng)}
