"""CellariumGPT: a transformer that predicts hidden gene counts (and metadata) of a cell from a prompt.

A cell is a set of tokens, one per sampled gene (and one per metadata field). Prompt tokens carry
their value; query tokens carry only their identity and a query flag. Each query attends to the
prompt and to itself, never to another query, so every query is predicted independently from the
same prompt (see :func:`prompt_diagonal_mask`). Gene values are predicted as a categorical
distribution over count bins 0 .. K-1 (the last bin holds every count >= K-1) with cross-entropy.

Inputs, as cellarium-ml's CellariumGPT takes them (``cellarium_steps.transforms.gpt_tokenizer``
builds them from raw counts), all of shape (n, c):

``token_value_nc_dict``
    ``gene_id`` (int, < ``categorical_token_size_dict["gene_id"]``), ``gene_value`` (float:
    log1p(count) on prompt genes, 0 on queries), optional ``gene_query_mask`` (1.0 on query genes)
    and ``total_mrna_umis`` (float: the cell's log1p total UMIs), and one int entry per metadata
    type in ``categorical_token_size_dict``; a metadata type that is also a label uses the code
    ``vocabulary size`` as its mask token at query positions.
``token_mask_nc_dict``
    the same keys: where each token type is present (bool or 0/1).
``prompt_mask_nc``
    bool, True at prompt positions.

Scaling follows cellarium-ml and muP (Yang et al. 2022, "Tensor Programs V"): attention logits are
scaled by 1/k (per-head width k) rather than 1/sqrt(k); with ``mup_base_d_model`` the q/k/v and
first feed-forward init std shrink by ``width_mult ** -0.5`` (width_mult = d_model / base), the
output logits are divided by width_mult, and :meth:`CellariumGPT.optimizer_param_groups` scales
those matrices' Adam learning rates by 1/width_mult; the output projections of attention and
feed-forward are also scaled by ``(2 * n_blocks) ** -0.5`` (depth). At the base width muP equals
the standard parametrisation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from cellarium_steps.models._transformer import (
    AttentionMask,
    MultiHeadReadout,
    TokenEmbedding,
    Transformer,
    check_attention_backend,
    prompt_diagonal_block_mask,
    prompt_diagonal_mask,
)
from cellarium_steps.models.base import CellariumModel, PredictMixin, ValidateMixin

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["CONTINUOUS_TOKENS", "CellariumGPT", "prompt_diagonal_mask"]

#: token types with a float value, embedded as value x a learned vector.
CONTINUOUS_TOKENS: tuple[str, ...] = ("gene_value", "gene_query_mask", "total_mrna_umis")
REQUIRED_VOCABULARIES = ("gene_id", "gene_value")


class CellariumGPT(CellariumModel, PredictMixin, ValidateMixin):
    """CellariumGPT model (cellarium-ml's API: same arguments, defaults and inputs).

    Args:
        categorical_token_size_dict: Vocabulary sizes; must include ``gene_value`` (count bins K)
            and ``gene_id`` (genes). Other keys are metadata token types (e.g. ``cell_type``).
        d_model: Width of embeddings and hidden states.
        d_ffn: Width of the feed-forward layers.
        n_heads: Attention heads (must divide ``d_model``).
        n_blocks: Transformer blocks.
        dropout_p: Dropout probability (residual branches and attention weights).
        use_bias: Biases in linear layers and layer norms.
        attention_backend: ``torch``, ``math``, ``mem_efficient`` or ``flex``.
        attention_softmax_fp32: Softmax in float32 with the ``torch`` backend on half-precision inputs.
        loss_scale_dict: Label types (queried token types) and the weight of each one's loss.
        initializer_range: Std of the truncated-normal initializer.
        embeddings_scale, attention_logits_scale, output_logits_scale: Multipliers.
        mup_base_d_model, mup_base_d_ffn: Base widths for muP (None: standard parametrisation).
    """

    def __init__(
        self,
        categorical_token_size_dict: dict[str, int],
        d_model: int,
        d_ffn: int,
        n_heads: int,
        n_blocks: int,
        dropout_p: float,
        use_bias: bool,
        attention_backend: Literal["flex", "math", "mem_efficient", "torch"],
        attention_softmax_fp32: bool,
        loss_scale_dict: dict[str, float],
        initializer_range: float = 0.02,
        embeddings_scale: float = 1.0,
        attention_logits_scale: float = 1.0,
        output_logits_scale: float = 1.0,
        mup_base_d_model: int | None = None,
        mup_base_d_ffn: int | None = None,
    ) -> None:
        super().__init__()
        _check_vocabularies(categorical_token_size_dict, loss_scale_dict)
        for name, value in (("d_model", d_model), ("d_ffn", d_ffn), ("n_heads", n_heads), ("n_blocks", n_blocks)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("mup_base_d_model", mup_base_d_model), ("mup_base_d_ffn", mup_base_d_ffn)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
        if not initializer_range > 0:
            raise ValueError(f"initializer_range must be positive, got {initializer_range}")
        check_attention_backend(attention_backend)

        self.categorical_token_size_dict = {str(k): int(v) for k, v in categorical_token_size_dict.items()}
        self.loss_scale_dict = {str(k): float(v) for k, v in loss_scale_dict.items()}
        self.d_model, self.d_ffn, self.n_heads, self.n_blocks = d_model, d_ffn, n_heads, n_blocks
        self.initializer_range = initializer_range
        self.embeddings_scale = embeddings_scale
        self.attention_logits_scale = attention_logits_scale
        self.mup_base_d_model, self.mup_base_d_ffn = mup_base_d_model, mup_base_d_ffn

        # muP width multipliers (1 without muP); init stds and learning rates of the hidden
        # matrices shrink with width so that every layer's update stays O(1) as the model widens.
        self.width_mult = d_model / mup_base_d_model if mup_base_d_model else 1.0
        self.ffn_width_mult = d_ffn / mup_base_d_ffn if mup_base_d_ffn else 1.0
        depth_scale = (2 * n_blocks) ** -0.5  # residual branches add up over 2 * n_blocks sublayers
        r = initializer_range
        Wqkv_std = dense1_std = r * self.width_mult**-0.5
        Wo_std = r * self.width_mult**-0.5 * depth_scale
        dense2_std = r * self.ffn_width_mult**-0.5 * depth_scale
        # The readout's input is O(1) per coordinate after the final layer norm and its update under
        # Adam is O(d): dividing by width_mult keeps the logits' change O(1) (muP's 1/fan_in output).
        self.output_logits_scale = output_logits_scale / self.width_mult

        # Labels get one extra code, the mask token shown at their query positions. gene_value is a
        # label only: its input is the continuous log1p count, so it has no input table.
        embedding_size_dict = {
            key: size + (1 if key in self.loss_scale_dict else 0)
            for key, size in self.categorical_token_size_dict.items() if key != "gene_value"
        }
        self.token_embedding = TokenEmbedding(embedding_size_dict, CONTINUOUS_TOKENS, d_model, r)
        self.transformer = Transformer(
            n_blocks=n_blocks, d_model=d_model, use_bias=use_bias, d_ffn=d_ffn, n_heads=n_heads, dropout_p=dropout_p,
            attention_logits_scale=attention_logits_scale, attention_backend=attention_backend,
            attention_softmax_fp32=attention_softmax_fp32, Wqkv_std=Wqkv_std, Wo_std=Wo_std, dense1_std=dense1_std,
            dense2_std=dense2_std,
        )
        self.head = MultiHeadReadout(
            {key: self.categorical_token_size_dict[key] for key in self.loss_scale_dict}, d_model, use_bias, r,
            self.output_logits_scale,
        )
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------------
    # Parameters

    def reset_parameters(self) -> None:
        for module in self.modules():
            reset = getattr(module, "_reset_parameters", None)
            if reset is not None:
                reset()

    @property
    def attention_backend(self) -> str:
        return self.transformer.blocks[0].attention.attention_backend

    @attention_backend.setter
    def attention_backend(self, value: str) -> None:
        check_attention_backend(value)
        for block in self.transformer.blocks:
            block.attention.attention_backend = value

    @property
    def max_context_len(self) -> int:
        """Longest context: every gene once plus one token per metadata type.

        There are no positional embeddings, so a longer context can only repeat a token, which the
        tokenizer never does: it is a sign of a wrong gene vocabulary or tokenizer.
        """
        n_metadata = sum(1 for key in self.categorical_token_size_dict if key not in REQUIRED_VOCABULARIES)
        return self.categorical_token_size_dict["gene_id"] + n_metadata

    def lr_scale_dict(self) -> dict[str, float]:
        """Learning-rate multiplier of each parameter (muP for Adam; all 1 without muP)."""
        scales = {}
        for name, _ in self.named_parameters():
            scale = 1.0
            if name.startswith("transformer.blocks.") and name.endswith(".weight"):
                if ".attention.W" in name or ".ffn.dense1." in name:
                    scale = 1 / self.width_mult
                elif ".ffn.dense2." in name:
                    scale = 1 / self.ffn_width_mult
            scales[name] = scale
        return scales

    def optimizer_param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Parameter groups for Adam/AdamW with muP's per-layer learning rates."""
        parameters = dict(self.named_parameters())
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for name, scale in self.lr_scale_dict().items():
            groups.setdefault(scale, []).append(parameters[name])
        return [{"params": params, "lr": lr * scale} for scale, params in groups.items()]

    # ------------------------------------------------------------------------------------------------
    # Forward

    def _attention_mask(self, prompt_mask_nc: torch.Tensor) -> AttentionMask:
        if self.attention_backend == "flex":
            return prompt_diagonal_block_mask(prompt_mask_nc)
        return prompt_diagonal_mask(prompt_mask_nc)

    def predict(
        self,
        token_value_nc_dict: dict[str, torch.Tensor],
        token_mask_nc_dict: dict[str, torch.Tensor],
        prompt_mask_nc: torch.Tensor,
    ) -> dict[str, np.ndarray | torch.Tensor]:
        """Logits of shape (n, c, k) for each label type in ``loss_scale_dict``."""
        prompt_mask_nc = self._check_tokens(token_value_nc_dict, token_mask_nc_dict, prompt_mask_nc)
        embedding_ncd = self.token_embedding(token_value_nc_dict, token_mask_nc_dict) * self.embeddings_scale
        hidden_ncd = self.transformer(embedding_ncd, self._attention_mask(prompt_mask_nc))
        return self.head(hidden_ncd)  # type: ignore[return-value]

    def forward(
        self,
        token_value_nc_dict: dict[str, torch.Tensor],
        token_mask_nc_dict: dict[str, torch.Tensor],
        prompt_mask_nc: torch.Tensor,
        label_nc_dict: dict[str, torch.Tensor],
        label_weight_nc_dict: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted cross-entropy per label type and their ``loss_scale_dict``-weighted sum, ``loss``.

        ``label_weight_nc_dict`` weighs each position's loss (the tokenizer gives 1/(cells x queries
        of the cell) at query positions, 0 elsewhere, so every cell counts the same). Without it, a
        label's loss is the mean over the positions where its token type is queried (present and not
        in the prompt).
        """
        logits_nck_dict = self.predict(token_value_nc_dict, token_mask_nc_dict, prompt_mask_nc)
        self._check_labels(label_nc_dict, label_weight_nc_dict, prompt_mask_nc.shape)
        prompt_mask_nc = prompt_mask_nc.bool()
        output: dict[str, torch.Tensor] = {}
        loss = None
        for key, scale in self.loss_scale_dict.items():
            logits_nck = logits_nck_dict[key]
            label_nc = label_nc_dict[key]
            # Cross-entropy in float32 whatever the compute dtype: log-softmax over K bins is where
            # half precision loses the small probabilities.
            loss_nc = F.cross_entropy(logits_nck.flatten(0, 1).float(), label_nc.flatten().long(),
                                      reduction="none").view_as(label_nc)
            if label_weight_nc_dict is not None:
                weight_nc = label_weight_nc_dict[key].to(loss_nc.dtype)
            else:
                weight_nc = (token_mask_nc_dict[key].bool() & ~prompt_mask_nc).to(loss_nc.dtype)
                weight_nc = weight_nc / weight_nc.sum().clamp_min(1.0)
            output[f"{key}_loss"] = (loss_nc * weight_nc).sum()
            term = output[f"{key}_loss"] * scale
            loss = term if loss is None else loss + term
        assert loss is not None
        output["loss"] = loss
        return output

    def validate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch_idx: int,
        token_value_nc_dict: dict[str, torch.Tensor],
        token_mask_nc_dict: dict[str, torch.Tensor],
        prompt_mask_nc: torch.Tensor,
        label_nc_dict: dict[str, torch.Tensor],
        label_weight_nc_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        output = self(token_value_nc_dict, token_mask_nc_dict, prompt_mask_nc, label_nc_dict, label_weight_nc_dict)
        pl_module.log_dict({f"val_{k}": v for k, v in output.items()}, sync_dist=True, on_epoch=True,
                           batch_size=prompt_mask_nc.shape[0])

    # ------------------------------------------------------------------------------------------------
    # Input checks: an index out of a table's range would otherwise be a device-side assert on GPU
    # (or a silently wrong row), and a mis-keyed dict would silently drop a token type.

    def _check_tokens(self, token_value_nc_dict: dict[str, torch.Tensor], token_mask_nc_dict: dict[str, torch.Tensor],
                      prompt_mask_nc: torch.Tensor) -> torch.Tensor:
        if prompt_mask_nc.dim() != 2:
            raise ValueError(f"prompt_mask_nc must have shape (n, c), got {tuple(prompt_mask_nc.shape)}")
        n, c = prompt_mask_nc.shape
        if c > self.max_context_len:
            raise ValueError(
                f"context of {c} tokens is longer than allowed: at most {self.max_context_len} (each of the "
                f"{self.categorical_token_size_dict['gene_id']} genes once plus one token per metadata type)"
            )
        embedding_sizes = {key: module.num_embeddings for key, module in self.token_embedding.embedding_dict.items()
                           if key not in CONTINUOUS_TOKENS}
        known = set(embedding_sizes) | set(CONTINUOUS_TOKENS)
        unknown = sorted(set(token_value_nc_dict) - known)
        if unknown:
            raise ValueError(f"token_value_nc_dict: unknown token types {unknown} (known: {sorted(known)})")
        missing = [key for key in REQUIRED_VOCABULARIES if key not in token_value_nc_dict]
        if missing:
            raise ValueError(f"token_value_nc_dict: missing token types {missing}")
        if set(token_mask_nc_dict) != set(token_value_nc_dict):
            raise ValueError(
                f"token_mask_nc_dict has keys {sorted(token_mask_nc_dict)}, token_value_nc_dict has "
                f"{sorted(token_value_nc_dict)}: they must be the same"
            )
        for key, value_nc in token_value_nc_dict.items():
            for what, tensor in (("token_value_nc_dict", value_nc), ("token_mask_nc_dict", token_mask_nc_dict[key])):
                if tuple(tensor.shape) != (n, c):
                    raise ValueError(f"{what}[{key!r}] has shape {tuple(tensor.shape)}, expected (n, c) = {(n, c)}")
            if key in CONTINUOUS_TOKENS:
                if not torch.isfinite(value_nc).all():
                    raise ValueError(f"token_value_nc_dict[{key!r}] has non-finite values")
                continue
            if value_nc.is_floating_point() and not torch.equal(value_nc, value_nc.round()):
                raise ValueError(f"token_value_nc_dict[{key!r}] must hold integer codes")
            _check_range(f"token_value_nc_dict[{key!r}]", value_nc, embedding_sizes[key],
                         " (its largest code is the query mask token)" if key in self.loss_scale_dict else "")
        return prompt_mask_nc.bool()

    def _check_labels(self, label_nc_dict: dict[str, torch.Tensor],
                      label_weight_nc_dict: dict[str, torch.Tensor] | None, shape: torch.Size) -> None:
        for what, d in (("label_nc_dict", label_nc_dict), ("label_weight_nc_dict", label_weight_nc_dict)):
            if d is not None and set(d) != set(self.loss_scale_dict):
                raise ValueError(f"{what} has keys {sorted(d)}; expected the loss_scale_dict keys "
                                 f"{sorted(self.loss_scale_dict)}")
            for key, tensor in (d or {}).items():
                if tensor.shape != shape:
                    raise ValueError(f"{what}[{key!r}] has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        for key, label_nc in label_nc_dict.items():
            _check_range(f"label_nc_dict[{key!r}]", label_nc, self.categorical_token_size_dict[key], "")


def _check_vocabularies(categorical_token_size_dict: dict[str, int], loss_scale_dict: dict[str, float]) -> None:
    missing = [key for key in REQUIRED_VOCABULARIES if key not in categorical_token_size_dict]
    if missing:
        raise ValueError(
            f"categorical_token_size_dict must include 'gene_id' and 'gene_value' vocabulary sizes; missing "
            f"{missing} (got {sorted(categorical_token_size_dict)})"
        )
    for key, size in categorical_token_size_dict.items():
        if key in CONTINUOUS_TOKENS[1:]:
            raise ValueError(f"categorical_token_size_dict: {key!r} is a continuous token, not a vocabulary")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"categorical_token_size_dict[{key!r}] must be a positive integer, got {size!r}")
    if not loss_scale_dict:
        raise ValueError("loss_scale_dict is empty: name at least one label type, e.g. {'gene_value': 1.0}")
    unknown = sorted(set(loss_scale_dict) - set(categorical_token_size_dict))
    if unknown:
        raise ValueError(f"loss_scale_dict: label types {unknown} have no vocabulary in categorical_token_size_dict")
    for key, scale in loss_scale_dict.items():
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
            raise ValueError(f"loss_scale_dict[{key!r}] must be a finite number >= 0, got {scale!r}")


def _check_range(what: str, codes: torch.Tensor, size: int, note: str) -> None:
    if codes.numel() == 0:
        return
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        raise ValueError(f"{what}: value {bad} is out of the vocabulary range [0, {size - 1}]{note}")

