"""Raw counts -> CellariumGPT's token dicts: c sampled genes per cell, a prompt with values, queries without.

For each cell, ``context_len`` distinct genes are drawn uniformly from the vocabulary (zeros
included: predicting that a gene is not detected is part of the task, as in cellarium-ml). The
first ``prompt_len`` of them form the prompt and show log1p(count); the rest are queries, whose
count is hidden (value 0, query flag 1) and becomes the label ``min(count, K - 1)``, K being the
gene-value vocabulary size. Every token also carries the cell's log1p total UMIs, so the model
knows the sequencing depth the counts come from. Draws use torch's global generator on the
batch's device, which the runner seeds per (seed, step, rank).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cellarium_steps._batch import check_var_names, is_sparse

__all__ = ["GPTTokenizer", "gather_counts", "tokenize_counts"]


def gather_counts(x_ng: torch.Tensor, gene_id_nc: torch.Tensor) -> torch.Tensor:
    """``x_ng[i, gene_id_nc[i, j]]`` for a dense, CSR or COO batch, without densifying a sparse one."""
    if not is_sparse(x_ng):
        return x_ng.gather(1, gene_id_nc)
    n, g = x_ng.shape
    if x_ng.layout == torch.sparse_csr:
        crow_n1 = x_ng.crow_indices().long()
        row_e = torch.repeat_interleave(torch.arange(n, device=x_ng.device), crow_n1.diff())
        col_e, value_e = x_ng.col_indices().long(), x_ng.values()
    else:
        x_ng = x_ng.coalesce()
        row_e, col_e = x_ng.indices()
        value_e = x_ng.values()
    # One sorted key per stored entry; each wanted (cell, gene) is then a binary search.
    key_e = row_e * g + col_e
    if key_e.numel() > 1 and not bool((key_e[1:] >= key_e[:-1]).all()):
        key_e, order_e = torch.sort(key_e)
        value_e = value_e[order_e]
    if key_e.numel() == 0:
        return torch.zeros(gene_id_nc.shape, dtype=x_ng.dtype, device=x_ng.device)
    key_nc = torch.arange(n, device=x_ng.device)[:, None] * g + gene_id_nc
    position_nc = torch.searchsorted(key_e, key_nc).clamp_max(key_e.numel() - 1)
    found_nc = key_e[position_nc] == key_nc
    return torch.where(found_nc, value_e[position_nc], torch.zeros((), dtype=value_e.dtype, device=x_ng.device))


def tokenize_counts(
    x_ng: torch.Tensor,
    total_mrna_umis_n: torch.Tensor,
    context_len: int,
    gene_value_vocab_size: int,
    prompt_fraction: float | None = None,
) -> dict[str, object]:
    """The keyword arguments of ``CellariumGPT.forward`` for a batch of raw counts (cells x vocabulary genes).

    ``prompt_fraction`` None draws each cell's prompt length uniformly from 0 .. c-1 (training sees
    every amount of context); a number fixes it to round(fraction * c) (evaluation, prediction).
    """
    n, g = x_ng.shape
    c = context_len
    if c > g:
        raise ValueError(f"context_len {c} is larger than the {g} genes of the batch")
    device = x_ng.device
    # Top-c of uniform keys: c distinct genes per cell, uniformly, in random order.
    gene_id_nc = torch.rand(n, g, device=device).topk(c, dim=1).indices
    count_nc = gather_counts(x_ng, gene_id_nc).float()

    if prompt_fraction is None:
        prompt_len_n = torch.randint(0, c, (n,), device=device)
    else:
        prompt_len_n = torch.full((n,), min(c, max(0, round(prompt_fraction * c))), device=device)
    prompt_mask_nc = torch.arange(c, device=device) < prompt_len_n[:, None]
    query_mask_nc = ~prompt_mask_nc

    present_nc = torch.ones(n, c, dtype=torch.bool, device=device)
    token_value_nc_dict = {
        "gene_id": gene_id_nc,
        "gene_value": torch.log1p(count_nc) * prompt_mask_nc,  # hidden (0) on queries
        "gene_query_mask": query_mask_nc.float(),
        "total_mrna_umis": torch.log1p(total_mrna_umis_n.float().to(device))[:, None].expand(n, c),
    }
    # Each cell weighs the same in the loss, whatever its number of queries: 1 / (n x its queries).
    n_query_n = query_mask_nc.sum(1, keepdim=True).clamp_min(1)
    return {
        "token_value_nc_dict": token_value_nc_dict,
        "token_mask_nc_dict": {key: present_nc for key in token_value_nc_dict},
        "prompt_mask_nc": prompt_mask_nc,
        "label_nc_dict": {"gene_value": count_nc.clamp(0, gene_value_vocab_size - 1).long()},
        "label_weight_nc_dict": {"gene_value": query_mask_nc.float() / (n_query_n * n)},
    }


class GPTTokenizer(nn.Module):
    """Transform turning a raw-count batch into CellariumGPT's inputs (see :func:`tokenize_counts`).

    Args:
        var_names_g: the gene vocabulary: gene id i is gene ``var_names_g[i]``; batches must have
            these genes in this order (put a ``Filter`` before the tokenizer to select them).
        context_len: genes per cell (c).
        gene_value_vocab_size: count bins K of the model's ``gene_value`` vocabulary.
        prompt_fraction: None to draw prompt lengths at random (training), or the fraction of the
            context that is prompt.
    """

    def __init__(self, var_names_g: Sequence[str], context_len: int, gene_value_vocab_size: int,
                 prompt_fraction: float | None = None) -> None:
        super().__init__()
        self.var_names_g = np.asarray(var_names_g, dtype=object)
        if context_len < 1:
            raise ValueError(f"context_len must be at least 1, got {context_len}")
        if context_len > len(self.var_names_g):
            raise ValueError(f"context_len {context_len} is larger than the vocabulary's {len(self.var_names_g)} genes")
        if gene_value_vocab_size < 2:
            raise ValueError(f"gene_value_vocab_size must be at least 2, got {gene_value_vocab_size}")
        if prompt_fraction is not None and not 0.0 <= prompt_fraction <= 1.0:
            raise ValueError(f"prompt_fraction must be in [0, 1] or None, got {prompt_fraction}")
        self.context_len = context_len
        self.gene_value_vocab_size = gene_value_vocab_size
        self.prompt_fraction = prompt_fraction
        self._checked_var_names_id: int | None = None

    def forward(self, x_ng: torch.Tensor, var_names_g: np.ndarray, total_mrna_umis_n: torch.Tensor) -> dict[str, object]:
        if self._checked_var_names_id != id(var_names_g):  # the data layer reuses one array: check it once
            check_var_names(self.var_names_g, var_names_g)
            self._checked_var_names_id = id(var_names_g)
        return tokenize_counts(x_ng, total_mrna_umis_n, self.context_len, self.gene_value_vocab_size,
                               self.prompt_fraction)
