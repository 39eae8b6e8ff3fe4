"""Transformer pieces of CellariumGPT: token embedding, prompt/query attention, blocks, readout.

Names follow cellarium-ml's layers (``Wq``/``Wk``/``Wv``/``Wo``, ``dense1``/``dense2``, pre-norm
``normadd1``/``normadd2``, a final ``ln``) so state dicts map one to one. Suffixes name the axes:
n cells, c context positions, d model width, h heads, k per-head width (d = h * k) or vocabulary.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # flex attention arrived in torch 2.5; the build may also lack it
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    BlockMask = None  # type: ignore[assignment,misc]
    create_block_mask = flex_attention = None  # type: ignore[assignment]

AttentionBackend = Literal["flex", "math", "mem_efficient", "torch"]
ATTENTION_BACKENDS: tuple[str, ...] = ("flex", "math", "mem_efficient", "torch")
#: the ``torch.nn.attention.sdpa_kernel`` backend that each forced-kernel choice pins.
_SDPA_BACKENDS = {"math": SDPBackend.MATH, "mem_efficient": SDPBackend.EFFICIENT_ATTENTION}
AttentionMask = Union[torch.Tensor, "BlockMask"]


def flex_attention_available() -> bool:
    return flex_attention is not None


def check_attention_backend(backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {list(ATTENTION_BACKENDS)}, got {backend!r}")
    if backend == "flex" and not flex_attention_available():
        raise ValueError(
            f"attention_backend='flex' needs torch.nn.attention.flex_attention, which this torch build "
            f"({torch.__version__}) lacks; use 'torch', 'math' or 'mem_efficient'"
        )


def trunc_normal_(weight: torch.Tensor, std: float) -> None:
    """cellarium-ml's initializer: a normal truncated at two standard deviations."""
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


def prompt_diagonal_mask(prompt_mask_nc: torch.Tensor) -> torch.Tensor:
    """``mask_ncc[n, q, k]``: may position q attend to position k? Prompt keys, and itself.

    Every position sees the prompt; a query position also sees itself and no other query, so the
    prediction at one query never depends on which other genes are being asked about. A prompt
    position is its own key already, so it sees exactly the prompt. E.g. prompt = [T, F, T, F]:
    rows are [T F T F], [T T T F], [T F T F], [T F T T].
    """
    c = prompt_mask_nc.shape[1]
    diagonal_cc = torch.eye(c, dtype=torch.bool, device=prompt_mask_nc.device)
    return prompt_mask_nc[:, None, :] | diagonal_cc


def prompt_diagonal_block_mask(prompt_mask_nc: torch.Tensor) -> BlockMask:
    """The same rule as :func:`prompt_diagonal_mask`, as flex attention's block-sparse mask."""
    n, c = prompt_mask_nc.shape

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return prompt_mask_nc[b, kv_idx] | (q_idx == kv_idx)

    return create_block_mask(mask_mod, B=n, H=None, Q_LEN=c, KV_LEN=c, device=prompt_mask_nc.device)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with muP's 1/k logit scaling and a choice of kernel.

    Backends give the same numbers up to rounding: ``torch`` lets ``F.scaled_dot_product_attention``
    pick its kernel (or, with ``attention_softmax_fp32`` and half-precision inputs, runs the softmax
    in float32 in plain torch ops); ``math`` and ``mem_efficient`` pin that kernel with
    ``sdpa_kernel``; ``flex`` runs ``flex_attention`` on a block mask (compiled on CUDA).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        use_bias: bool,
        dropout_p: float,
        attention_logits_scale: float,
        attention_backend: AttentionBackend,
        attention_softmax_fp32: bool,
        Wqkv_std: float,
        Wo_std: float,
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.Wq = nn.Linear(d_model, d_model, bias=use_bias)
        self.Wk = nn.Linear(d_model, d_model, bias=use_bias)
        self.Wv = nn.Linear(d_model, d_model, bias=use_bias)
        self.Wo = nn.Linear(d_model, d_model, bias=use_bias)
        self.n_heads = n_heads
        self.dropout_p = dropout_p
        self.attention_logits_scale = attention_logits_scale
        self.attention_backend = attention_backend
        self.attention_softmax_fp32 = attention_softmax_fp32
        self.Wqkv_std = Wqkv_std
        self.Wo_std = Wo_std
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for linear, std in ((self.Wq, self.Wqkv_std), (self.Wk, self.Wqkv_std), (self.Wv, self.Wqkv_std),
                            (self.Wo, self.Wo_std)):
            trunc_normal_(linear.weight, std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def _split_heads(self, x_ncd: torch.Tensor) -> torch.Tensor:
        n, c, d = x_ncd.shape
        return x_ncd.reshape(n, c, self.n_heads, d // self.n_heads).transpose(1, 2)  # _nhck

    def forward(self, x_ncd: torch.Tensor, attention_mask: AttentionMask) -> torch.Tensor:
        query_nhck = self._split_heads(self.Wq(x_ncd))
        key_nhck = self._split_heads(self.Wk(x_ncd))
        value_nhck = self._split_heads(self.Wv(x_ncd))
        # muP: logits scale as 1/k, not 1/sqrt(k), since after training q and k are correlated and
        # their dot product grows like k. Used with and without muP, so a muP model at its base
        # width is the standard model.
        scale = self.attention_logits_scale / query_nhck.shape[-1]
        dropout_p = self.dropout_p if self.training else 0.0
        backend = self.attention_backend
        if backend == "flex":
            output_nhck = self._flex(query_nhck, key_nhck, value_nhck, attention_mask, scale, dropout_p)
        else:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(f"attention_backend={backend!r} takes a boolean (n, c, c) mask")
            mask_n1cc = attention_mask[:, None]  # broadcast over heads
            if backend == "torch" and self.attention_softmax_fp32 and query_nhck.dtype in (torch.float16,
                                                                                         torch.bfloat16):
                output_nhck = self._fp32_softmax(query_nhck, key_nhck, value_nhck, mask_n1cc, scale, dropout_p)
            elif backend == "torch":
                output_nhck = F.scaled_dot_product_attention(
                    query_nhck, key_nhck, value_nhck, attn_mask=mask_n1cc, dropout_p=dropout_p, scale=scale
                )
            else:
                try:
                    with sdpa_kernel(_SDPA_BACKENDS[backend]):
                        output_nhck = F.scaled_dot_product_attention(
                            query_nhck, key_nhck, value_nhck, attn_mask=mask_n1cc, dropout_p=dropout_p, scale=scale
                        )
                except RuntimeError as e:
                    if "No viable backend" not in str(e) and "No available kernel" not in str(e):
                        raise
                    raise RuntimeError(
                        f"attention_backend={backend!r} has no kernel for {query_nhck.dtype} inputs on "
                        f"{query_nhck.device.type} (PyTorch's memory-efficient attention needs CUDA); "
                        f"use 'torch' or 'math' there"
                    ) from None
        n, h, c, k = output_nhck.shape
        return self.Wo(output_nhck.transpose(1, 2).reshape(n, c, h * k))  # _ncd

    @staticmethod
    def _fp32_softmax(query_nhck: torch.Tensor, key_nhck: torch.Tensor, value_nhck: torch.Tensor,
                      mask_n1cc: torch.Tensor, scale: float, dropout_p: float) -> torch.Tensor:
        # Half-precision logits lose the small differences the softmax amplifies; the matmuls stay
        # in the input dtype, only the softmax runs in float32.
        logits_nhcc = torch.matmul(query_nhck, key_nhck.transpose(-1, -2) * scale)
        logits_nhcc = logits_nhcc.float().masked_fill(~mask_n1cc, float("-inf"))
        weights_nhcc = torch.softmax(logits_nhcc, dim=-1).to(value_nhck.dtype)
        weights_nhcc = F.dropout(weights_nhcc, dropout_p, training=dropout_p > 0)
        return torch.matmul(weights_nhcc, value_nhck)

    @staticmethod
    def _flex(query_nhck: torch.Tensor, key_nhck: torch.Tensor, value_nhck: torch.Tensor,
              block_mask: AttentionMask, scale: float, dropout_p: float) -> torch.Tensor:
        if dropout_p > 0:
            raise ValueError("attention_backend='flex' does not support attention dropout: set dropout_p=0 or "
                             "use another backend for training")
        if isinstance(block_mask, torch.Tensor):
            raise TypeError("attention_backend='flex' takes a BlockMask (prompt_diagonal_block_mask)")
        if query_nhck.device.type == "cuda":
            return _compiled_flex_attention()(query_nhck, key_nhck, value_nhck, block_mask=block_mask, scale=scale)
        if torch.is_grad_enabled() and query_nhck.requires_grad:
            raise ValueError(
                f"attention_backend='flex' has no backward pass on {query_nhck.device.type} in torch "
                f"{torch.__version__}: train with 'torch' or 'math' there (flex serves inference)"
            )
        with warnings.catch_warnings():
            # Off CUDA the unfused reference implementation is the point: no compiler needed.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(query_nhck, key_nhck, value_nhck, block_mask=block_mask, scale=scale)


_COMPILED_FLEX = None


def _compiled_flex_attention():
    # Compiled lazily, once per process: compiling at import would cost every step's start-up.
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


class PositionWiseFFN(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, use_bias: bool, dense1_std: float, dense2_std: float) -> None:
        super().__init__()
        self.dense1 = nn.Linear(d_model, d_ffn, bias=use_bias)
        self.activation = nn.GELU()
        self.dense2 = nn.Linear(d_ffn, d_model, bias=use_bias)
        self.dense1_std = dense1_std
        self.dense2_std = dense2_std
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for linear, std in ((self.dense1, self.dense1_std), (self.dense2, self.dense2_std)):
            trunc_normal_(linear.weight, std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x_ncd: torch.Tensor) -> torch.Tensor:
        return self.dense2(self.activation(self.dense1(x_ncd)))


class NormAdd(nn.Module):
    """Pre-norm residual: ``x + dropout(sublayer(layer_norm(x)))``."""

    def __init__(self, d_model: int, dropout_p: float, use_bias: bool) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout_p)
        self.ln = nn.LayerNorm(d_model, bias=use_bias)

    def _reset_parameters(self) -> None:
        self.ln.reset_parameters()

    def forward(self, hidden_ncd: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return hidden_ncd + self.dropout(sublayer(self.ln(hidden_ncd)))


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, n_heads: int, dropout_p: float, use_bias: bool,
                 attention_logits_scale: float, attention_backend: AttentionBackend, attention_softmax_fp32: bool,
                 Wqkv_std: float, Wo_std: float, dense1_std: float, dense2_std: float) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(d_model, n_heads, use_bias, dropout_p, attention_logits_scale,
                                            attention_backend, attention_softmax_fp32, Wqkv_std, Wo_std)
        self.normadd1 = NormAdd(d_model, dropout_p, use_bias)
        self.ffn = PositionWiseFFN(d_model, d_ffn, use_bias, dense1_std, dense2_std)
        self.normadd2 = NormAdd(d_model, dropout_p, use_bias)

    def forward(self, hidden_ncd: torch.Tensor, attention_mask: AttentionMask) -> torch.Tensor:
        hidden_ncd = self.normadd1(hidden_ncd, lambda x_ncd: self.attention(x_ncd, attention_mask))
        return self.normadd2(hidden_ncd, self.ffn)


class Transformer(nn.Module):
    """``n_blocks`` pre-norm blocks and a final layer norm."""

    def __init__(self, n_blocks: int, d_model: int, use_bias: bool, **block_kwargs) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model=d_model, use_bias=use_bias, **block_kwargs) for _ in range(n_blocks)
        )
        self.ln = nn.LayerNorm(d_model, bias=use_bias)

    def _reset_parameters(self) -> None:
        self.ln.reset_parameters()

    def forward(self, hidden_ncd: torch.Tensor, attention_mask: AttentionMask) -> torch.Tensor:
        for block in self.blocks:
            hidden_ncd = block(hidden_ncd, attention_mask)
        return self.ln(hidden_ncd)


class TokenEmbedding(nn.Module):
    """Sum over token types of each type's embedding times that type's mask.

    Categorical types look their value up in a table; continuous types (a gene's log1p count, its
    query flag, the cell's log1p total UMIs) multiply a learned d-vector. A position carries the
    types its masks switch on: a gene position has gene id, value, query flag and total UMIs, a
    metadata position only its own type.
    """

    def __init__(self, categorical_size_dict: dict[str, int], continuous_keys: tuple[str, ...], d_model: int,
                 std: float) -> None:
        super().__init__()
        self.embedding_dict = nn.ModuleDict({key: nn.Embedding(size, d_model) for key, size in
                                             categorical_size_dict.items()})
        self.embedding_dict.update({key: nn.Linear(1, d_model, bias=False) for key in continuous_keys})
        self.continuous_keys = continuous_keys
        self.std = std
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for module in self.embedding_dict.values():
            trunc_normal_(module.weight, self.std)

    def forward(self, token_value_nc_dict: dict[str, torch.Tensor],
                token_mask_nc_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        embedding_ncd: torch.Tensor | None = None
        for key, value_nc in token_value_nc_dict.items():
            module = self.embedding_dict[key]
            if key in self.continuous_keys:
                term_ncd = module(value_nc.to(module.weight.dtype).unsqueeze(-1))
            else:
                term_ncd = module(value_nc.long())
            term_ncd = term_ncd * token_mask_nc_dict[key].to(term_ncd.dtype).unsqueeze(-1)
            embedding_ncd = term_ncd if embedding_ncd is None else embedding_ncd + term_ncd
        assert embedding_ncd is not None
        return embedding_ncd


class MultiHeadReadout(nn.Module):
    """One linear head per label type: logits of shape (n, c, vocabulary size), times a multiplier."""

    def __init__(self, size_dict: dict[str, int], d_model: int, use_bias: bool, std: float,
                 output_logits_scale: float) -> None:
        super().__init__()
        self.W = nn.ModuleDict({key: nn.Linear(d_model, size, bias=use_bias) for key, size in size_dict.items()})
        self.std = std
        self.output_logits_scale = output_logits_scale
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for linear in self.W.values():
            trunc_normal_(linear.weight, self.std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, hidden_ncd: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: self.output_logits_scale * linear(hidden_ncd) for key, linear in self.W.items()}
