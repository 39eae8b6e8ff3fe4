"""scvi-tools beside our scVI, for parity tests and the mapping diagnostics: scvi-tools' weights under our
module names, gradients paired by name, train-scvi started from scvi-tools' weights (recording what its
model sees), and scvi-tools' training plan replaying what was recorded."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from cellarium_steps.data.dataset import collate_identity
from cellarium_steps.models import SingleCellVariationalInference
from cellarium_steps.runner.module import training_step_seed


def _copy_linear(state: dict, ours: dict, ours_prefix: str, weight: torch.Tensor, bias: torch.Tensor,
                 n_in: int, n_batch: int) -> None:
    """scvi-tools' Linear([input, one-hot batch, one-hot covariates]) into our split weights."""
    ours[f"{ours_prefix}.weight"] = weight[:, :n_in]
    if f"{ours_prefix}.batch_weight" in state:
        ours[f"{ours_prefix}.batch_weight"] = weight[:, n_in : n_in + n_batch]
    if f"{ours_prefix}.categorical_weight" in state:
        ours[f"{ours_prefix}.categorical_weight"] = weight[:, n_in + n_batch :]
    n_used = sum(ours[f"{ours_prefix}.{k}"].shape[1] for k in ("weight", "batch_weight", "categorical_weight")
                 if f"{ours_prefix}.{k}" in ours)
    assert n_used == weight.shape[1]
    ours[f"{ours_prefix}.bias"] = bias


def scvi_tools_state_to_ours(vae: torch.nn.Module, model: SingleCellVariationalInference, n_layers: int) -> dict:
    """Map an scvi-tools VAE's weights onto our module names (the same architecture)."""
    theirs = vae.state_dict()
    state = model.state_dict()
    ours: dict[str, torch.Tensor] = {}

    def batch_norm(theirs_prefix: str, ours_prefix: str) -> None:
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            ours[f"{ours_prefix}.{key}"] = theirs[f"{theirs_prefix}.{key}"]

    n_batch = model.n_batch_features
    for i in range(n_layers):
        for side, theirs_prefix in (("z_encoder", "z_encoder.encoder"), ("decoder", "decoder.px_decoder")):
            t = f"{theirs_prefix}.fc_layers.Layer {i}"
            n_in = state[f"{side}.hidden.layers.{i}.layer.weight"].shape[1]
            _copy_linear(state, ours, f"{side}.hidden.layers.{i}.layer", theirs[f"{t}.0.weight"],
                         theirs[f"{t}.0.bias"], n_in, n_batch)
            if f"{t}.1.weight" in theirs:  # batch norm (scvi-tools keeps a None in its place without it)
                batch_norm(f"{t}.1", f"{side}.hidden.layers.{i}.batch_norm")
    for theirs_name, ours_name in (("mean_encoder", "mean_layer"), ("var_encoder", "var_layer")):
        for key in ("weight", "bias"):
            ours[f"z_encoder.{ours_name}.{key}"] = theirs[f"z_encoder.{theirs_name}.{key}"]
    for key in ("weight", "bias"):
        ours[f"decoder.scale_layer.{key}"] = theirs[f"decoder.px_scale_decoder.0.{key}"]
        if "decoder.dispersion_layer.weight" in state:
            ours[f"decoder.dispersion_layer.{key}"] = theirs[f"decoder.px_r_decoder.{key}"]
    if "px_r" in state:
        ours["px_r"] = theirs["px_r"]
    assert set(ours) == set(state), set(ours) ^ set(state)
    return ours


def paired_gradients(model: SingleCellVariationalInference, vae: torch.nn.Module, n_layers: int):
    """Yield (name, our gradient, scvi-tools' gradient of the same numbers) for every parameter."""
    ours = dict(model.named_parameters())
    theirs = dict(vae.named_parameters())
    for i in range(n_layers):
        for side, theirs_prefix in (("z_encoder", "z_encoder.encoder"), ("decoder", "decoder.px_decoder")):
            t = f"{theirs_prefix}.fc_layers.Layer {i}"
            layer = f"{side}.hidden.layers.{i}.layer"
            weight = theirs[f"{t}.0.weight"].grad
            n_in = ours[f"{layer}.weight"].shape[1]
            yield f"{layer}.weight", ours[f"{layer}.weight"].grad, weight[:, :n_in]
            n_b = ours[f"{layer}.batch_weight"].shape[1] if f"{layer}.batch_weight" in ours else 0
            if n_b:
                yield f"{layer}.batch_weight", ours[f"{layer}.batch_weight"].grad, weight[:, n_in : n_in + n_b]
            if f"{layer}.categorical_weight" in ours:
                yield f"{layer}.categorical_weight", ours[f"{layer}.categorical_weight"].grad, weight[:, n_in + n_b :]
            yield f"{layer}.bias", ours[f"{layer}.bias"].grad, theirs[f"{t}.0.bias"].grad
            for key in ("weight", "bias"):
                norm = f"{side}.hidden.layers.{i}.batch_norm.{key}"
                if norm in ours:
                    yield norm, ours[norm].grad, theirs[f"{t}.1.{key}"].grad
    for theirs_name, ours_name in (("mean_encoder", "mean_layer"), ("var_encoder", "var_layer")):
        for key in ("weight", "bias"):
            yield ours_name, ours[f"z_encoder.{ours_name}.{key}"].grad, theirs[f"z_encoder.{theirs_name}.{key}"].grad
    for key in ("weight", "bias"):
        yield "scale_layer", ours[f"decoder.scale_layer.{key}"].grad, theirs[f"decoder.px_scale_decoder.0.{key}"].grad
        if f"decoder.dispersion_layer.{key}" in ours:
            yield ("dispersion_layer", ours[f"decoder.dispersion_layer.{key}"].grad,
                   theirs[f"decoder.px_r_decoder.{key}"].grad)
    if "px_r" in ours:
        yield "px_r", ours["px_r"].grad, theirs["px_r"].grad


@contextlib.contextmanager
def train_scvi_from_scvi_tools_weights(vae: torch.nn.Module, n_layers: int,
                                       record: list[dict] | None = None) -> Iterator[None]:
    """Within: every ``SingleCellVariationalInference`` built starts from scvi-tools' ``vae`` weights, and with
    ``record``, each training forward appends the batch its model sees (``X``, ``batch``, ``labels`` as
    scvi-tools' training plan takes them), ``var_names_g``, ``kl_weight`` and ``loss``. Models built after
    the block (a query's, with more batches) get their own weights again."""
    reset_parameters, forward = SingleCellVariationalInference.reset_parameters, SingleCellVariationalInference.forward

    def reset_to_scvi_tools(self: SingleCellVariationalInference) -> None:
        reset_parameters(self)
        self.load_state_dict(scvi_tools_state_to_ours(vae, self, n_layers))

    def recording_forward(self: SingleCellVariationalInference, x_ng, var_names_g, batch_index_n, *args, **kwargs):
        output = forward(self, x_ng, var_names_g, batch_index_n, *args, **kwargs)
        if self.training:
            batch_n1 = batch_index_n.clone()[:, None]
            record.append({"X": x_ng.to_dense().clone(), "batch": batch_n1, "labels": torch.zeros_like(batch_n1),
                           "var_names_g": var_names_g, "kl_weight": float(self.z_kl_weight),
                           "loss": float(output["loss"].detach())})
        return output

    SingleCellVariationalInference.reset_parameters = reset_to_scvi_tools
    if record is not None:
        SingleCellVariationalInference.forward = recording_forward
    try:
        yield
    finally:
        SingleCellVariationalInference.reset_parameters = reset_parameters
        SingleCellVariationalInference.forward = forward


class SeedAsTrainScvi(pl.Callback):
    """Seeds torch's generator before each training step as train-scvi does (``CellariumModule``,
    ``training_step_seed``), so an scvi-tools run draws the dropout masks and reparametrisation noise that
    train-scvi would draw at that step and rank."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.random.default_generator.manual_seed(training_step_seed(self.seed, trainer.global_step,
                                                                      trainer.global_rank))


def replay_in_scvi_tools(vae: torch.nn.Module, steps: list[dict], seed: int, warmup_steps: int,
                         learning_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """scvi-tools' ``TrainingPlan`` on ``vae`` (its weights as they are, in training mode) over recorded steps,
    torch seeded before each step as train-scvi seeds it (the same dropout masks and reparametrisation
    noise); the losses and KL weights."""
    from scvi.train import TrainingPlan

    losses, kl_weights = [], []

    class SeedAndLog(SeedAsTrainScvi):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))
            kl_weights.append(float(pl_module.kl_weight))

    batches = [{key: step[key] for key in ("X", "batch", "labels")} for step in steps]
    # Lightning 2 keeps a module's mode through fit, and SCVI.train leaves its module in evaluation mode.
    vae.train()
    plan = TrainingPlan(vae, lr=learning_rate, n_steps_kl_warmup=warmup_steps, n_epochs_kl_warmup=None)
    # One epoch of every recorded step: scvi-tools' warm-up by steps counts global steps only.
    pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[SeedAndLog(seed)]).fit(
        plan, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=collate_identity))
    return np.array(losses), np.array(kl_weights)
