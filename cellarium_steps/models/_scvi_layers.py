"""Layers of the scVI encoder and decoder, the dict format that describes a stack of them, and the two networks.

The format (one dict for the encoder, one for the decoder; see
:class:`~cellarium_steps.models.scvi.SingleCellVariationalInference`)::

    {
        "hidden_layers": [                      # applied in order; may be empty
            {"class_path": "LinearWithBatch", "init_args": {"out_features": 128}},
        ],
        "final_layer": {"class_path": "Linear", "init_args": {}},
        "final_additive_bias": False,           # decoder only
        "input_continuous_covariates": False,   # encoder only
    }

``class_path`` names what a layer sees besides the previous layer's output:

* ``"Linear"`` (or ``"torch.nn.Linear"``): nothing else.
* ``"LinearWithBatch"``: the batch representation (one-hot, or the batch embedding).
* ``"LinearWithBatchAndCovariates"``: the batch representation and the one-hot categorical
  covariates: scvi-tools' ``FCLayers`` layer into which covariates are injected.

A dotted prefix (``cellarium_steps.models.scvi.``, ``cellarium_steps.models._scvi_layers.``, or
cellarium-ml's ``cellarium.ml.models.scvi.``) may precede the short name, so cellarium-ml configs
read as they are. Only these classes are accepted: a config names architecture, not code to import.

``init_args``: ``out_features`` (required for a hidden layer; not allowed for a final layer, whose
width the model fixes) and ``bias`` (default True). cellarium-ml's ``batch_to_bias_hidden_layers``
and ``label_to_bias_hidden_layers`` are accepted only as ``[]``, which is the linear injection
implemented here.

Every hidden layer is "dressed" as scvi-tools' ``FCLayers`` dresses it: linear, then
``BatchNorm1d(momentum=0.01, eps=0.001)`` where the model's ``use_batch_norm`` asks for it,
``LayerNorm(elementwise_affine=False)`` where ``use_layer_norm`` asks for it, ReLU, and dropout
(``dropout_rate``, encoder only). The dressing comes from the model's options, not from the layer
dict, so one switch changes every layer alike; a cellarium-ml ``dressing_init_args`` entry is
accepted only when it agrees with them. Final layers are not dressed.

scvi-tools' ``deeply_inject_covariates=True`` is a stack of ``LinearWithBatchAndCovariates`` hidden
layers; ``False`` is one such layer followed by plain ``Linear`` layers. Its default encoder
(``encode_covariates=False``) is a stack of ``Linear`` layers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.distributions import Normal

_PREFIXES = ("cellarium_steps.models.scvi.", "cellarium_steps.models._scvi_layers.", "cellarium.ml.models.scvi.")
_CELLARIUM_ML_EMPTY_ARGS = ("batch_to_bias_hidden_layers", "label_to_bias_hidden_layers")
#: scvi-tools' floor on the encoder's variance.
VAR_EPS = 1e-4
#: the additive bias (``final_additive_bias``) starts near zero counts: softplus(-6.9) ~ 1e-3.
ADDITIVE_BIAS_INIT = math.log(math.expm1(1e-3))


class LinearWithBatch(nn.Linear):
    """A linear layer that also sees the batch representation of each cell.

    ``y = W x + W_b b + bias``. This equals scvi-tools' concatenation ``Linear([x, b])`` (the
    weight is ``[weight, batch_weight]``); it is computed as that concatenation, so the numbers
    are those of scvi-tools, and it is initialised like that single ``nn.Linear``, whose fan-in
    counts the covariate columns.

    Args:
        in_features: Width of the previous layer's output.
        out_features: Width of this layer's output.
        n_batch_features: Width of the batch representation (0: no batches, the layer is plain).
        bias: Learn an additive bias.
    """

    injects_categorical = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_batch_features: int,
        n_categorical_features: int = 0,
        bias: bool = True,
    ) -> None:
        self.n_batch_features = n_batch_features
        self.n_categorical_features = n_categorical_features if self.injects_categorical else 0
        # nn.Linear.__init__ calls reset_parameters, which needs the covariate weights to exist.
        self._building = True
        super().__init__(in_features, out_features, bias=bias)
        # Zero-width weights are not registered: DDP fails on parameters that never get a gradient.
        self.batch_weight: nn.Parameter | None = None
        self.categorical_weight: nn.Parameter | None = None
        if n_batch_features:
            self.batch_weight = nn.Parameter(torch.empty(out_features, n_batch_features))
        if self.n_categorical_features:
            self.categorical_weight = nn.Parameter(torch.empty(out_features, self.n_categorical_features))
        self._building = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if getattr(self, "_building", False):
            return
        # nn.Linear's default init over the whole concatenated weight, as scvi-tools' layer has it.
        fan_in = self.in_features + self.n_batch_features + self.n_categorical_features
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        for weight in (self.weight, self.batch_weight, self.categorical_weight):
            if weight is not None:
                nn.init.uniform_(weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(  # type: ignore[override]
        self,
        x_nh: torch.Tensor,
        batch_nb: torch.Tensor | None = None,
        categorical_np: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs = [x_nh]
        weights = [self.weight]
        if self.batch_weight is not None:
            if batch_nb is None:
                raise ValueError(f"{type(self).__name__} needs the batch representation")
            inputs.append(batch_nb.to(x_nh.dtype))
            weights.append(self.batch_weight)
        if self.categorical_weight is not None:
            if categorical_np is None:
                raise ValueError(
                    f"{type(self).__name__} needs the categorical covariates (categorical_covariate_index_nd)"
                )
            inputs.append(categorical_np.to(x_nh.dtype))
            weights.append(self.categorical_weight)
        if len(inputs) == 1:
            return nn.functional.linear(x_nh, self.weight, self.bias)
        return nn.functional.linear(torch.cat(inputs, dim=-1), torch.cat(weights, dim=1), self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, n_batch_features={self.n_batch_features}, "
            f"n_categorical_features={self.n_categorical_features}"
        )


class LinearWithBatchAndCovariates(LinearWithBatch):
    """:class:`LinearWithBatch` that also sees the one-hot categorical covariates.

    ``y = W x + W_b b + W_c c + bias``: scvi-tools' ``FCLayers`` layer with ``n_cat_list =
    [n_batch, *n_cats_per_cov]`` injected, with the same column order (batch, then covariates).
    """

    injects_categorical = True


LAYER_CLASSES: dict[str, type[nn.Linear]] = {
    "Linear": nn.Linear,
    "LinearWithBatch": LinearWithBatch,
    "LinearWithBatchAndCovariates": LinearWithBatchAndCovariates,
}


def resolve_layer_class(class_path: str) -> type[nn.Linear]:
    """The layer class a ``class_path`` names: a short name, optionally with a known module prefix."""
    name = class_path
    if name == "torch.nn.Linear":
        name = "Linear"
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name not in LAYER_CLASSES:
        known = ", ".join(LAYER_CLASSES)
        raise ValueError(f"unknown layer class_path {class_path!r}; known layers: {known} (optionally prefixed)")
    return LAYER_CLASSES[name]


def build_layer(
    spec: Mapping[str, Any],
    in_features: int,
    *,
    out_features: int | None,
    n_batch_features: int,
    n_categorical_features: int,
    where: str,
) -> nn.Linear:
    """Instantiate one layer dict; ``out_features=None`` means a hidden layer whose dict gives its width."""
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ValueError(f"{where}: expected a dict with 'class_path' (and optionally 'init_args'), got {spec!r}")
    unknown = set(spec) - {"class_path", "init_args", "dressing_init_args"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; a layer has 'class_path' and 'init_args'")
    cls = resolve_layer_class(str(spec["class_path"]))
    init_args = dict(spec.get("init_args") or {})
    for key in _CELLARIUM_ML_EMPTY_ARGS:
        if key in init_args:
            if list(init_args.pop(key)) != []:
                raise NotImplementedError(
                    f"{where}: {key} must be [] (a covariate-to-bias network is not implemented; "
                    "the covariates enter linearly)"
                )
    if out_features is None:
        if "out_features" not in init_args:
            raise ValueError(f"{where}: a hidden layer needs init_args.out_features")
        out_features = int(init_args.pop("out_features"))
        if out_features < 1:
            raise ValueError(f"{where}: out_features must be positive, got {out_features}")
    elif "out_features" in init_args:
        raise ValueError(f"{where}: a final layer's width is fixed by the model; remove init_args.out_features")
    bias = bool(init_args.pop("bias", True))
    if init_args:
        raise ValueError(f"{where}: unknown init_args {sorted(init_args)}; a layer takes out_features and bias")
    if cls is nn.Linear:
        return nn.Linear(in_features, out_features, bias=bias)
    return cls(in_features, out_features, n_batch_features=n_batch_features,
               n_categorical_features=n_categorical_features, bias=bias)


def takes_covariates(layer: nn.Module) -> bool:
    return isinstance(layer, LinearWithBatch)


def apply_layer(
    layer: nn.Module, x_nh: torch.Tensor, batch_nb: torch.Tensor | None, categorical_np: torch.Tensor | None
) -> torch.Tensor:
    if takes_covariates(layer):
        return layer(x_nh, batch_nb, categorical_np)
    return layer(x_nh)


class DressedLayer(nn.Module):
    """One hidden layer as scvi-tools' FCLayers builds it: linear, batch norm, layer norm, ReLU, dropout."""

    def __init__(self, layer: nn.Linear, use_batch_norm: bool, use_layer_norm: bool, dropout_rate: float) -> None:
        super().__init__()
        out_features = layer.out_features
        self.layer = layer
        # momentum and eps are scvi-tools' (from the original TensorFlow scVI).
        self.batch_norm = nn.BatchNorm1d(out_features, momentum=0.01, eps=0.001) if use_batch_norm else None
        self.layer_norm = nn.LayerNorm(out_features, elementwise_affine=False) if use_layer_norm else None
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(p=dropout_rate) if dropout_rate > 0 else None

    def forward(
        self, x_nh: torch.Tensor, batch_nb: torch.Tensor | None = None, categorical_np: torch.Tensor | None = None
    ) -> torch.Tensor:
        x_nh = apply_layer(self.layer, x_nh, batch_nb, categorical_np)
        if self.batch_norm is not None:
            x_nh = self.batch_norm(x_nh)
        if self.layer_norm is not None:
            x_nh = self.layer_norm(x_nh)
        x_nh = self.activation(x_nh)
        if self.dropout is not None:
            x_nh = self.dropout(x_nh)
        return x_nh


class HiddenStack(nn.Module):
    """The hidden layers of an encoder or decoder; the identity when there are none."""

    def __init__(
        self,
        in_features: int,
        layer_specs: Sequence[Mapping[str, Any]],
        *,
        n_batch_features: int,
        n_categorical_features: int,
        use_batch_norm: bool,
        use_layer_norm: bool,
        dropout_rate: float,
        where: str,
    ) -> None:
        super().__init__()
        if isinstance(layer_specs, (str, Mapping)) or not isinstance(layer_specs, Sequence):
            raise ValueError(f"{where}.hidden_layers must be a list of layer dicts")
        self.layers = nn.ModuleList()
        width = in_features
        for i, spec in enumerate(layer_specs):
            name = f"{where}.hidden_layers[{i}]"
            _check_dressing(spec, name, use_batch_norm, use_layer_norm, dropout_rate)
            layer = build_layer(spec, width, out_features=None, n_batch_features=n_batch_features,
                                n_categorical_features=n_categorical_features, where=name)
            self.layers.append(DressedLayer(layer, use_batch_norm, use_layer_norm, dropout_rate))
            width = layer.out_features
        self.out_features = width

    def forward(
        self, x_nh: torch.Tensor, batch_nb: torch.Tensor | None, categorical_np: torch.Tensor | None
    ) -> torch.Tensor:
        for layer in self.layers:
            x_nh = layer(x_nh, batch_nb, categorical_np)
        return x_nh


def scvi_tools_default_architecture(
    n_hidden: int = 128, n_layers: int = 1, *, encode_covariates: bool = False, deeply_inject_covariates: bool = True
) -> tuple[dict, dict]:
    """Encoder and decoder dicts of scvi-tools' ``VAE`` (its defaults: the default ``VAE``).

    ``encode_covariates=False``: the encoder sees only the (log1p) counts, a stack of ``Linear`` layers.
    ``True``: its first hidden layer also sees the batch and categorical covariates
    (``LinearWithBatchAndCovariates``), and the later ones with ``deeply_inject_covariates``. The
    decoder's first hidden layer always sees them, the later ones with ``deeply_inject_covariates``
    (as scvi-tools' ``FCLayers.inject_into_layer``). Final layers (the latent mean and variance, the
    normalized-expression head) are plain linear layers.
    """

    def stack(injects: bool) -> list[dict]:
        def layer(i: int) -> dict:
            inject = injects and (i == 0 or deeply_inject_covariates)
            return {"class_path": "LinearWithBatchAndCovariates" if inject else "Linear",
                    "init_args": {"out_features": n_hidden}}

        return [layer(i) for i in range(n_layers)]

    encoder = {"hidden_layers": stack(encode_covariates), "final_layer": {"class_path": "Linear", "init_args": {}}}
    decoder = {
        "hidden_layers": stack(True),
        "final_layer": {"class_path": "Linear", "init_args": {}},
        "final_additive_bias": False,
    }
    return encoder, decoder


def _check_dressing(
    spec: Mapping[str, Any], where: str, use_batch_norm: bool, use_layer_norm: bool, dropout_rate: float
) -> None:
    """cellarium-ml configs carry per-layer dressing; accept it only where it says what the model does."""
    dressing = spec.get("dressing_init_args") if isinstance(spec, Mapping) else None
    if not dressing:
        return
    model_values = {"use_batch_norm": use_batch_norm, "use_layer_norm": use_layer_norm, "dropout_rate": dropout_rate}
    for key, value in dressing.items():
        if key not in model_values:
            raise ValueError(f"{where}.dressing_init_args: unknown key {key!r} (known: {sorted(model_values)})")
        if type(model_values[key])(value) != model_values[key]:
            raise ValueError(
                f"{where}.dressing_init_args.{key}={value!r} disagrees with the model's setting "
                f"({model_values[key]!r}); norms and dropout are set for all layers by the model's "
                "use_batch_norm, use_layer_norm and dropout_rate"
            )


def check_architecture_dict(spec: Mapping[str, Any], where: str, allowed: set[str]) -> dict[str, Any]:
    """A deep copy of an encoder/decoder dict after checking its keys, so the caller's dict is never changed."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where} must be a dict with 'hidden_layers' and 'final_layer'")
    missing = {"hidden_layers", "final_layer"} - set(spec)
    if missing:
        raise ValueError(f"{where}: missing keys {sorted(missing)}")
    unknown = set(spec) - {"hidden_layers", "final_layer"} - allowed
    if unknown:
        known = ", ".join(["hidden_layers", "final_layer", *sorted(allowed)])
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {known})")
    return copy.deepcopy(dict(spec))


class EncoderSCVI(nn.Module):
    """q(z | x): hidden stack, then two copies of the final layer for the mean and the log-variance."""

    def __init__(
        self,
        in_features: int,
        n_latent: int,
        spec: Mapping[str, Any],
        *,
        n_batch_features: int,
        n_categorical_features: int,
        use_batch_norm: bool,
        use_layer_norm: bool,
        dropout_rate: float,
    ) -> None:
        super().__init__()
        self.hidden = HiddenStack(
            in_features, spec["hidden_layers"], n_batch_features=n_batch_features,
            n_categorical_features=n_categorical_features, use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm, dropout_rate=dropout_rate, where="encoder",
        )
        build = dict(out_features=n_latent, n_batch_features=n_batch_features,
                     n_categorical_features=n_categorical_features, where="encoder.final_layer")
        self.mean_layer = build_layer(spec["final_layer"], self.hidden.out_features, **build)  # type: ignore[arg-type]
        self.var_layer = build_layer(spec["final_layer"], self.hidden.out_features, **build)  # type: ignore[arg-type]

    def forward(
        self, x_ng: torch.Tensor, batch_nb: torch.Tensor | None, categorical_np: torch.Tensor | None
    ) -> Normal:
        q_nh = self.hidden(x_ng, batch_nb, categorical_np)
        mean_nk = apply_layer(self.mean_layer, q_nh, batch_nb, categorical_np)
        var_nk = torch.exp(apply_layer(self.var_layer, q_nh, batch_nb, categorical_np)) + VAR_EPS
        return Normal(mean_nk, var_nk.sqrt())


class DecoderSCVI(nn.Module):
    """p(x | z): hidden stack, normalized expression head, optional per-cell dispersion and additive bias."""

    def __init__(
        self,
        in_features: int,
        n_genes: int,
        spec: Mapping[str, Any],
        *,
        n_batch_features: int,
        n_categorical_features: int,
        use_batch_norm: bool,
        use_layer_norm: bool,
        scale_activation: Literal["softmax", "softplus"],
        cell_dispersion: bool,
    ) -> None:
        super().__init__()
        self.hidden = HiddenStack(
            in_features, spec["hidden_layers"], n_batch_features=n_batch_features,
            n_categorical_features=n_categorical_features, use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm, dropout_rate=0.0, where="decoder",
        )
        width = self.hidden.out_features
        self.scale_layer = build_layer(
            spec["final_layer"], width, out_features=n_genes, n_batch_features=n_batch_features,
            n_categorical_features=n_categorical_features, where="decoder.final_layer",
        )
        self.scale_activation = nn.Softmax(dim=-1) if scale_activation == "softmax" else nn.Softplus()
        # scvi-tools' px_r_decoder: a plain linear head, as for 'gene-cell' there.
        self.dispersion_layer = nn.Linear(width, n_genes) if cell_dispersion else None
        self.additive_bias_layer: nn.Linear | None = None
        self.n_batch_features = n_batch_features
        self.n_categorical_features = n_categorical_features
        if bool(spec.get("final_additive_bias", False)):
            # Without covariates it reads one zero column: a per-gene bias, and no zero-size weight for DDP.
            self.additive_bias_layer = nn.Linear(max(n_batch_features + n_categorical_features, 1), n_genes)

    def reset_additive_bias(self) -> None:
        if self.additive_bias_layer is not None:
            nn.init.zeros_(self.additive_bias_layer.weight)
            nn.init.constant_(self.additive_bias_layer.bias, ADDITIVE_BIAS_INIT)

    def forward(
        self,
        decoder_input_nk: torch.Tensor,
        library_size_n1: torch.Tensor,
        batch_nb: torch.Tensor | None,
        categorical_np: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(normalized expression, mean counts, log inverse dispersion per cell or None)."""
        q_nh = self.hidden(decoder_input_nk, batch_nb, categorical_np)
        scale_ng = self.scale_activation(apply_layer(self.scale_layer, q_nh, batch_nb, categorical_np))
        rate_ng = torch.exp(library_size_n1) * scale_ng
        if self.additive_bias_layer is not None:
            covariates = [t for t in (batch_nb, categorical_np) if t is not None and t.shape[-1] > 0]
            n_cells = decoder_input_nk.shape[0]
            covariates_nc = torch.cat(covariates, dim=-1) if covariates else decoder_input_nk.new_zeros(n_cells, 1)
            # Background counts per batch (and covariate), independent of the cell's state and depth.
            rate_ng = rate_ng + nn.functional.softplus(self.additive_bias_layer(covariates_nc.to(rate_ng.dtype)))
        log_theta_ng = self.dispersion_layer(q_nh) if self.dispersion_layer is not None else None
        return scale_ng, rate_ng, log_theta_ng
