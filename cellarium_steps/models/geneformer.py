"""Geneformer: a BERT encoder over rank-value encoded cells, trained by masked language modelling.

A cell becomes a sentence of gene tokens ordered by decreasing normalized expression (its
"rank-value encoding", Theodoris et al.); the model learns to recover masked genes from their
context. The encoder and masked-LM head are Hugging Face ``transformers``' ``BertForMaskedLM``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import BertConfig, BertForMaskedLM

from cellarium_steps.models._tensors import densify
from cellarium_steps.models.base import CellariumModel, PredictMixin, check_var_names

__all__ = ["MASK_TOKEN_ID", "N_SPECIAL_TOKENS", "PAD_TOKEN_ID", "Geneformer"]

PAD_TOKEN_ID = 0
MASK_TOKEN_ID = 1
#: gene g is token ``N_SPECIAL_TOKENS + g``.
N_SPECIAL_TOKENS = 2
#: BERT's recipe: of the tokens chosen for the loss, 80% become MASK, 10% a random gene, 10% stay.
MASK_REPLACE_FRACTION = 0.8
RANDOM_REPLACE_FRACTION = 0.1
#: ``CrossEntropyLoss``'s and Hugging Face's "no label here".
IGNORE_INDEX = -100


class Geneformer(CellariumModel, PredictMixin):
    """Geneformer model.

    **References:**

    1. `Transfer learning enables predictions in network biology (Theodoris et al.)
       <https://www.nature.com/articles/s41586-023-06139-9>`_.

    Tokenization of a cell (``tokenize``): each count is divided by the cell's total count and by
    the gene's normalization factor ``norm_factor_g`` (ones unless set, e.g. from the per-gene
    median of the non-zero counts, :meth:`set_norm_factor`); genes with a zero count are left out;
    the others are ordered by decreasing normalized value, ties by increasing gene index; the first
    ``max_position_embeddings`` are kept; shorter cells are padded with PAD (0), which the attention
    mask hides. Gene ``g`` (position ``g`` of ``var_names_g``) is token ``2 + g``; 1 is MASK.

    Args:
        var_names_g: The variable names schema for the input data validation.
        hidden_size: Dimensionality of the encoder layers and the pooler layer.
        num_hidden_layers: Number of hidden layers in the Transformer encoder.
        num_attention_heads: Number of attention heads for each attention layer in the Transformer encoder.
        intermediate_size: Dimensionality of the "intermediate" (feed-forward) layer in the Transformer encoder.
        hidden_act: The non-linear activation function in the encoder: ``"gelu"``, ``"relu"``, ``"silu"`` or
            ``"gelu_new"``.
        hidden_dropout_prob: The dropout probability for all fully connected layers in the embeddings and encoder.
        attention_probs_dropout_prob: The dropout ratio for the attention probabilities.
        max_position_embeddings: The maximum sequence length (genes per cell) this model can be used with.
        type_vocab_size: The vocabulary size of the ``token_type_ids`` of :class:`transformers.BertModel`.
        initializer_range: The standard deviation of the truncated normal initializer of the weight matrices.
        position_embedding_type: Type of position embedding. ``transformers`` 5 removed BERT's relative
            position embeddings (``"relative_key"``, ``"relative_key_query"``), so only ``"absolute"`` is
            accepted with it.
        layer_norm_eps: The epsilon used by the layer normalization layers.
        mlm_probability: Ratio of tokens to mask for masked language modeling loss.
    """

    def __init__(
        self,
        var_names_g: np.ndarray,
        hidden_size: int = 256,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 4,
        intermediate_size: int = 512,
        hidden_act: str = "relu",
        hidden_dropout_prob: float = 0.02,
        attention_probs_dropout_prob: float = 0.02,
        max_position_embeddings: int = 2048,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        position_embedding_type: str = "absolute",
        layer_norm_eps: float = 1e-12,
        mlm_probability: float = 0.15,
    ) -> None:
        super().__init__()
        self.var_names_g = np.asarray(var_names_g)
        self.n_vars = len(self.var_names_g)
        if self.n_vars == 0:
            raise ValueError("var_names_g is empty: the model needs at least one gene")
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings must be at least 1, got {max_position_embeddings}")
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
            )
        if position_embedding_type != "absolute":
            raise ValueError(
                f"position_embedding_type={position_embedding_type!r} is not available: transformers "
                f"{transformers.__version__} removed BERT's relative position embeddings; use 'absolute'"
            )
        self.mlm_probability = float(mlm_probability)
        self.max_position_embeddings = int(max_position_embeddings)
        self.vocab_size = self.n_vars + N_SPECIAL_TOKENS
        self.config = BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            hidden_act=hidden_act,
            hidden_dropout_prob=hidden_dropout_prob,
            attention_probs_dropout_prob=attention_probs_dropout_prob,
            max_position_embeddings=max_position_embeddings,
            type_vocab_size=type_vocab_size,
            initializer_range=initializer_range,
            layer_norm_eps=layer_norm_eps,
            pad_token_id=PAD_TOKEN_ID,
        )
        self.bert = BertForMaskedLM(self.config)
        self.norm_factor_g: torch.Tensor
        self.register_buffer("norm_factor_g", torch.ones(self.n_vars))
        # Name lookups for the perturbations; duplicated names are only an error when one is looked up.
        self._gene_index = {name: i for i, name in enumerate(self.var_names_g.tolist())}
        self._duplicated = {name for name, count in zip(*np.unique(self.var_names_g, return_counts=True)) if count > 1}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.norm_factor_g.fill_(1.0)
        # transformers marks initialized modules and tensors and skips them on later calls; clear
        # the marks so this really draws new weights.
        for module in self.bert.modules():
            module.__dict__.pop("_is_hf_initialized", None)
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                tensor.__dict__.pop("_is_hf_initialized", None)
        self.bert.init_weights()

    # ------------------------------------------------------------------------------------------------------
    # Tokenization

    def set_norm_factor(self, factor_g: torch.Tensor | np.ndarray | Sequence[float]) -> None:
        """Set the per-gene divisor of the normalized counts (e.g. each gene's non-zero median).

        Geneformer divides by each gene's median so that ubiquitous high-count genes (ribosomal,
        mitochondrial) do not take the top ranks of every cell, and rarely but strongly expressed
        genes (transcription factors) move up.
        """
        factor_g = torch.as_tensor(np.asarray(factor_g, dtype=np.float32))
        if factor_g.shape != (self.n_vars,):
            raise ValueError(f"the normalization factor has shape {tuple(factor_g.shape)}, expected ({self.n_vars},)")
        if not (torch.isfinite(factor_g).all() and (factor_g > 0).all()):
            raise ValueError("the normalization factor must be positive and finite for every gene")
        self.norm_factor_g.copy_(factor_g.to(self.norm_factor_g.device))

    def normalize(self, x_ng: torch.Tensor) -> torch.Tensor:
        """Counts divided by the cell's total and by the gene's factor (a new dense tensor)."""
        x_ng = densify(x_ng).to(torch.float32)
        total_n1 = x_ng.sum(dim=1, keepdim=True)
        return x_ng / total_n1.clamp_min(torch.finfo(torch.float32).tiny) / self.norm_factor_g

    def _rank_values(self, x_ng: torch.Tensor) -> torch.Tensor:
        """The values whose order is the cell's rank order.

        Dividing by the cell's total multiplies a whole row by one positive number, which cannot
        change its order in exact arithmetic but can round two close values onto one float (a tie
        broken by gene index instead of by expression). x / factor alone is rounded once, so
        equal ratios tie exactly and distinct ones stay apart.
        """
        return densify(x_ng).to(torch.float32) / self.norm_factor_g

    def _tokenize_values(self, value_ng: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = min(self.n_vars, self.max_position_embeddings)
        # A stable descending sort keeps equal values in increasing gene index: deterministic ties.
        sorted_value_ng, order_ng = torch.sort(value_ng, dim=1, descending=True, stable=True)
        sorted_value_nc, order_nc = sorted_value_ng[:, :c], order_ng[:, :c]
        attention_mask_nc = (sorted_value_nc > 0).long()
        input_ids_nc = torch.where(attention_mask_nc.bool(), order_nc + N_SPECIAL_TOKENS, PAD_TOKEN_ID)
        return input_ids_nc, attention_mask_nc

    def tokenize(self, x_ng: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-value encode cells: ``(input_ids_nc, attention_mask_nc)``, ``c = min(genes, max_position_embeddings)``."""
        self._check_counts(x_ng)
        return self._tokenize_values(self._rank_values(x_ng))

    def tokenize_with_perturbations(
        self,
        x_ng: torch.Tensor,
        feature_activation: Sequence[str] | None = None,
        feature_deletion: Sequence[str] | None = None,
        feature_map: Mapping[str, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokenize`` with the in silico perturbations of :meth:`predict` (the input is not modified)."""
        self._check_counts(x_ng)
        activation_k = self._lookup("feature_activation", feature_activation or [])
        deletion_k = self._lookup("feature_deletion", feature_deletion or [])
        map_genes_m = self._lookup("feature_map", list(feature_map or {}))
        both = sorted(set(activation_k.tolist()) & set(deletion_k.tolist()))
        if both:
            raise ValueError(
                f"genes cannot be both activated and deleted: {[str(self.var_names_g[g]) for g in both][:5]}"
            )
        c = min(self.n_vars, self.max_position_embeddings)
        if len(activation_k) > c:
            raise ValueError(
                f"feature_activation lists {len(activation_k)} genes but a cell holds at most {c} tokens "
                f"(max_position_embeddings={self.max_position_embeddings}): the sequence would be too long"
            )
        map_tokens_m = torch.as_tensor([int(t) for t in (feature_map or {}).values()], dtype=torch.long)
        bad = (map_tokens_m < 0) | (map_tokens_m >= self.vocab_size)
        if bad.any():
            raise ValueError(f"feature_map tokens must be in [0, {self.vocab_size}), got {map_tokens_m[bad].tolist()}")

        value_ng = self._rank_values(x_ng)  # a new tensor: the caller's batch stays as it was
        if len(deletion_k):
            # A zero leaves the gene out, so the next-ranked gene moves up into its place.
            value_ng[:, deletion_k.to(value_ng.device)] = 0.0
        if len(activation_k):
            # Above every value of the batch, the first listed gene highest.
            top = value_ng.max().clamp_min(0.0)
            k = len(activation_k)
            offsets_k = torch.arange(k, 0, -1, dtype=value_ng.dtype, device=value_ng.device)
            value_ng[:, activation_k.to(value_ng.device)] = top + offsets_k
        input_ids_nc, attention_mask_nc = self._tokenize_values(value_ng)
        for g, token in zip(map_genes_m.tolist(), map_tokens_m.tolist()):
            at_nc = input_ids_nc == g + N_SPECIAL_TOKENS
            input_ids_nc[at_nc] = token
            if token == PAD_TOKEN_ID:
                # A PAD is hidden from attention wherever it stands, as in tokenization.
                attention_mask_nc[at_nc] = 0
        return input_ids_nc, attention_mask_nc

    def _lookup(self, what: str, names: Sequence[str]) -> torch.Tensor:
        if isinstance(names, str):
            raise TypeError(f"{what} must be a list of gene names, got the string {names!r}")
        names = list(names)
        missing = [n for n in names if n not in self._gene_index]
        if missing:
            raise ValueError(f"{what}: {len(missing)} genes are not in the model's var_names_g, e.g. {missing[:5]}")
        ambiguous = [n for n in names if n in self._duplicated]
        if ambiguous:
            raise ValueError(f"{what}: genes appear more than once in var_names_g: {ambiguous[:5]}")
        if len(set(names)) != len(names):
            raise ValueError(f"{what}: a gene is listed more than once")
        return torch.as_tensor([self._gene_index[n] for n in names], dtype=torch.long)

    def _check_counts(self, x_ng: torch.Tensor) -> None:
        if x_ng.dim() != 2 or x_ng.shape[1] != self.n_vars:
            raise ValueError(f"x_ng has shape {tuple(x_ng.shape)}, expected (cells, {self.n_vars})")

    def _check_input(self, x_ng: torch.Tensor, var_names_g: np.ndarray) -> None:
        check_var_names(self.var_names_g, var_names_g)
        self._check_counts(x_ng)
        if x_ng.layout == torch.sparse_coo:
            values = x_ng.coalesce().values()
        else:
            values = x_ng.values() if x_ng.layout == torch.sparse_csr else x_ng
        if values.numel() and values.min() < 0:
            raise ValueError("x_ng has negative values: Geneformer ranks non-negative expression counts")

    def _check_tokens(self, input_ids_nc: torch.Tensor, attention_mask_nc: torch.Tensor) -> None:
        if input_ids_nc.dim() != 2 or input_ids_nc.shape != attention_mask_nc.shape:
            raise ValueError(
                f"input_ids_nc {tuple(input_ids_nc.shape)} and attention_mask_nc {tuple(attention_mask_nc.shape)} "
                "must be matching (cells, tokens) matrices"
            )
        if input_ids_nc.shape[1] > self.max_position_embeddings:
            raise ValueError(
                f"sequences of {input_ids_nc.shape[1]} tokens are longer than max_position_embeddings="
                f"{self.max_position_embeddings}"
            )
        if input_ids_nc.numel() and (input_ids_nc.min() < 0 or input_ids_nc.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")

    # ------------------------------------------------------------------------------------------------------
    # Training

    def mask_tokens(
        self, input_ids_nc: torch.Tensor, attention_mask_nc: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking: ``(masked input_ids_nc, labels_nc)``; labels are -100 where no loss is taken.

        Each real (non-PAD) token is chosen with probability ``mlm_probability``; a chosen token
        becomes MASK (80%), a random gene (10%) or stays (10%). PADs are never chosen.
        """
        real_nc = attention_mask_nc.bool()
        chosen_nc = (torch.rand(input_ids_nc.shape, device=input_ids_nc.device) < self.mlm_probability) & real_nc
        if not chosen_nc.any() and real_nc.any():
            # A batch with no chosen token has no loss, and a DDP rank without gradients stalls the others.
            real_e = real_nc.flatten().nonzero().squeeze(1)
            pick = real_e[torch.randint(len(real_e), (1,), device=real_e.device)]
            chosen_nc.view(-1)[pick] = True
        labels_nc = torch.where(chosen_nc, input_ids_nc, IGNORE_INDEX)
        draw_nc = torch.rand(input_ids_nc.shape, device=input_ids_nc.device)
        to_mask_nc = chosen_nc & (draw_nc < MASK_REPLACE_FRACTION)
        to_random_nc = chosen_nc & (draw_nc >= MASK_REPLACE_FRACTION) & (
            draw_nc < MASK_REPLACE_FRACTION + RANDOM_REPLACE_FRACTION
        )
        random_ids_nc = torch.randint_like(input_ids_nc, self.n_vars) + N_SPECIAL_TOKENS
        masked_ids_nc = torch.where(to_mask_nc, MASK_TOKEN_ID, input_ids_nc)
        masked_ids_nc = torch.where(to_random_nc, random_ids_nc, masked_ids_nc)
        return masked_ids_nc, labels_nc

    def mlm_loss(self, input_ids_nc: torch.Tensor, attention_mask_nc: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the masked-LM head at the labelled positions of one masking draw."""
        self._check_tokens(input_ids_nc, attention_mask_nc)
        masked_ids_nc, labels_nc = self.mask_tokens(input_ids_nc, attention_mask_nc)
        hidden_nch = self.bert.bert(input_ids=masked_ids_nc, attention_mask=attention_mask_nc).last_hidden_state
        labelled_nc = labels_nc != IGNORE_INDEX
        # The head only at labelled positions: scoring every position against the whole gene
        # vocabulary (tokens x genes logits) would cost ~7x the memory and time for the same loss.
        logits_mv = self.bert.cls(hidden_nch[labelled_nc])
        return F.cross_entropy(logits_mv, labels_nc[labelled_nc])

    def forward(self, x_ng: torch.Tensor, var_names_g: np.ndarray) -> dict[str, torch.Tensor]:
        """
        Args:
            x_ng: Gene counts matrix.
            var_names_g: The list of the variable names in the input data.

        Returns:
            A dictionary with the loss value.
        """
        self._check_input(x_ng, var_names_g)
        input_ids_nc, attention_mask_nc = self.tokenize(x_ng)
        if not attention_mask_nc.any():
            # No expressed gene, nothing to learn; a zero that still reaches every parameter keeps
            # DDP's gradient all-reduce in step with the other ranks.
            return {"loss": sum(p.sum() for p in self.parameters()) * 0.0}
        # Columns where every cell is padded change nothing for the real tokens (absolute positions,
        # PADs hidden from attention); dropping them saves the quadratic attention on them.
        c = int(attention_mask_nc.sum(dim=1).max())
        return {"loss": self.mlm_loss(input_ids_nc[:, :c], attention_mask_nc[:, :c])}

    # ------------------------------------------------------------------------------------------------------
    # Prediction

    @contextmanager
    def _attention_implementation(self, output_attentions: bool) -> Iterator[None]:
        # The default kernel (sdpa) is faster and lighter but cannot return attention probabilities.
        previous = self.bert.config._attn_implementation
        if not output_attentions or previous == "eager":
            yield
            return
        self.bert.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.bert.set_attn_implementation(previous)

    def encode(
        self,
        input_ids_nc: torch.Tensor,
        attention_mask_nc: torch.Tensor,
        output_hidden_states: bool = True,
        output_attentions: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Run the encoder on token sequences (at most ``max_position_embeddings`` long).

        Returns ``hidden_states`` (``num_hidden_layers + 1`` layers: the embeddings, then each
        layer's output; shape (layers, n, c, hidden)) and ``attentions`` (one per layer; shape
        (layers, n, heads, c, c), rows sum to 1 over the non-PAD keys) as asked. Each is stacked
        along a leading layer axis, so ``out["hidden_states"][-1]`` is the last layer as with
        Hugging Face's tuples.
        """
        self._check_tokens(input_ids_nc, attention_mask_nc)
        with self._attention_implementation(output_attentions):
            out = self.bert.bert(
                input_ids=input_ids_nc,
                attention_mask=attention_mask_nc,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
            )
        result: dict[str, torch.Tensor] = {}
        if output_hidden_states:
            result["hidden_states"] = torch.stack(out.hidden_states)
        if output_attentions:
            result["attentions"] = torch.stack(out.attentions)
        return result

    def predict(
        self,
        x_ng: torch.Tensor,
        var_names_g: np.ndarray,
        output_hidden_states: bool = True,
        output_attentions: bool = True,
        output_input_ids: bool = True,
        output_attention_mask: bool = True,
        feature_activation: list[str] | None = None,
        feature_deletion: list[str] | None = None,
        feature_map: dict[str, int] | None = None,
    ) -> dict[str, torch.Tensor | np.ndarray]:
        """Send (transformed) data through the model and return outputs.

        Optionally perform in silico perturbations and masking.

        Args:
            x_ng: Gene counts matrix.
            var_names_g: The list of the variable names in the input data.
            output_hidden_states: Whether to return all hidden-states (key ``hidden_states``).
            output_attentions: Whether to return all attentions (key ``attentions``).
            output_input_ids: Whether to return input ids (key ``input_ids``).
            output_attention_mask: Whether to return attention mask (key ``attention_mask``).
            feature_activation: Features whose expression is set above the batch's largest normalized value
                before tokenization (top rank; the first listed feature first).
            feature_deletion: Features whose expression is set to zero before tokenization (removed from the
                inputs, so the next-ranked feature takes their place).
            feature_map: A mapping from a feature to the token that replaces it after tokenization, e.g.
                ``{"ENSG0001": 1}`` (MASK) or ``{"ENSG0001": 0}`` (PAD, hidden from attention).

        Returns:
            A dictionary with the inference results; see :meth:`encode` for the shapes.
        """
        self._check_input(x_ng, var_names_g)
        input_ids_nc, attention_mask_nc = self.tokenize_with_perturbations(
            x_ng, feature_activation=feature_activation, feature_deletion=feature_deletion, feature_map=feature_map
        )
        output: dict[str, torch.Tensor | np.ndarray] = {}
        if output_hidden_states or output_attentions:
            output.update(self.encode(input_ids_nc, attention_mask_nc, output_hidden_states, output_attentions))
        if output_input_ids:
            output["input_ids"] = input_ids_nc
        if output_attention_mask:
            output["attention_mask"] = attention_mask_nc
        return output
