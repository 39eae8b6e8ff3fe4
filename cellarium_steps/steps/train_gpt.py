"""cellarium-steps train-gpt: train a CellariumGPT (prompt -> hidden counts transformer) on raw counts, streamed."""

from __future__ import annotations

import argparse
import logging

import lightning.pytorch as pl
import numpy as np
import torch

from cellarium_steps.data import ShardDataModule
from cellarium_steps.models.cellarium_gpt import CellariumGPT
from cellarium_steps.runner import CellariumModule
from cellarium_steps.runner.recipe import spec
from cellarium_steps.steps._training import fit_and_publish, resumable_trainer
from cellarium_steps.steps.common import ConfigError, add_common_arguments, provenance, selected_genes
from cellarium_steps.transforms.filter import Filter
from cellarium_steps.transforms.gpt_tokenizer import GPTTokenizer

logger = logging.getLogger("cellarium_steps")

NAME = "train-gpt"
HELP = "train a CellariumGPT transformer that predicts hidden gene counts of a cell from a prompt of its genes"
EPILOG = """model:
  cellarium-ml's CellariumGPT. Each cell becomes --context-len genes drawn at random (zeros included):
  a random-length prompt shows log1p(count), the other genes are queries whose count, clipped to
  --gene-value-vocab - 1, the model predicts as a class (cross-entropy). A query attends to the prompt
  and itself only. Every token also carries the cell's log1p total UMIs. The defaults are a small model
  that trains on a laptop CPU; scale --d-model, --n-blocks, --n-heads and --context-len up on a GPU.

outputs:
  OUTPUT (.ckpt)            the final Lightning checkpoint: weights, optimizer state, and the recipe
                            that rebuilds the pipeline (the --genes filter, the tokenizer and the model's
                            constructor arguments) and provenance. CellariumModule.from_checkpoint()
                            rebuilds it; its predict() gives gene-value logits of shape (cells, context, K).
  OUTPUT.d/last.ckpt        checkpoint of the last finished epoch, written atomically every epoch; a run
                            started again with the same options resumes from it
  OUTPUT + .provenance.json the run's config and versions

example:
  cellarium-steps train-gpt --input 'shards/*.h5ad' --genes out/hvg.csv --max-epochs 5 --output out/gpt.ckpt"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, batch_size=128)
    group = parser.add_argument_group("train-gpt options")
    group.add_argument(
        "--genes", metavar="PATH",
        help="the gene vocabulary: a CSV with 'gene' and 'highly_variable' columns (the hvg step's output) or a "
        "text file with one gene per line (default: all genes)",
    )
    group.add_argument("--max-epochs", type=int, default=10, metavar="N", help="passes over the data (default: 10)")
    group.add_argument(
        "--max-steps", type=int, default=None, metavar="N",
        help="stop after this many optimizer steps, even mid-epoch (default: no limit)",
    )
    group.add_argument(
        "--learning-rate", type=float, default=1e-3, metavar="LR", help="Adam learning rate (default: 1e-3)"
    )
    group.add_argument("--context-len", type=int, default=128, metavar="C", help="genes per cell (default: 128)")
    group.add_argument(
        "--gene-value-vocab", type=int, default=128, metavar="K",
        help="count classes 0 .. K-1; counts >= K-1 fall in the last (default: 128)",
    )
    group.add_argument("--d-model", type=int, default=64, metavar="D", help="hidden width (default: 64)")
    group.add_argument(
        "--d-ffn", type=int, default=None, metavar="D", help="feed-forward width (default: 2 x --d-model)"
    )
    group.add_argument("--n-heads", type=int, default=2, metavar="H", help="attention heads (default: 2)")
    group.add_argument("--n-blocks", type=int, default=2, metavar="N", help="transformer blocks (default: 2)")
    group.add_argument("--dropout", type=float, default=0.0, metavar="P", help="dropout probability (default: 0)")
    group.add_argument(
        "--attention-backend", default="torch", choices=("torch", "math", "mem_efficient", "flex"),
        help="attention kernel (default: torch; mem_efficient needs CUDA, flex trains on CUDA only)",
    )


def _check_options(args: argparse.Namespace) -> None:
    for name in ("max_epochs", "context_len", "d_model", "n_heads", "n_blocks"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps: must be at least 1, got {args.max_steps}")
    if args.d_ffn is not None and args.d_ffn < 1:
        raise ConfigError(f"--d-ffn: must be at least 1, got {args.d_ffn}")
    if args.gene_value_vocab < 2:
        raise ConfigError(f"--gene-value-vocab: must be at least 2, got {args.gene_value_vocab}")
    if args.d_model % args.n_heads:
        raise ConfigError(f"--d-model {args.d_model} must be a multiple of --n-heads {args.n_heads}")
    if not 0.0 <= args.dropout < 1.0:
        raise ConfigError(f"--dropout: must be in [0, 1), got {args.dropout}")
    if not args.learning_rate > 0:
        raise ConfigError(f"--learning-rate: must be positive, got {args.learning_rate}")
    on_cpu = args.accelerator == "cpu" or (args.accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and args.attention_backend in ("mem_efficient", "flex"):
        # mem_efficient has CUDA kernels only; flex attention has no backward pass on CPU.
        raise ConfigError(f"--attention-backend {args.attention_backend} cannot train on CPU: use torch or math")
    if args.attention_backend == "flex" and args.dropout > 0:
        raise ConfigError("--attention-backend flex does not support --dropout > 0")
    if not str(args.output).endswith(".ckpt"):
        raise ConfigError(f"--output: the checkpoint path must end in .ckpt, got {args.output!r}")


def run(args: argparse.Namespace) -> None:
    _check_options(args)
    datamodule = ShardDataModule(
        args.input, batch_size=args.batch_size, batch_key=args.batch_key, num_workers=args.num_workers,
        shuffle=True, seed=args.seed,
    )
    collection = datamodule.collection
    genes = selected_genes(args.genes, collection.var_names_g, collection.shards[0].path)
    var_names_g = np.asarray(genes if genes is not None else collection.var_names_g)
    if args.context_len > len(var_names_g):
        raise ConfigError(f"--context-len {args.context_len} is larger than the {len(var_names_g)} genes modelled")

    trainer, resume_from = resumable_trainer(args)
    datamodule.dataset.set_distributed(0, trainer.world_size)
    logger.info(
        "%d cells, %d genes; context %d genes; %d steps per epoch per device",
        collection.n_obs, len(var_names_g), args.context_len, len(datamodule.dataset),
    )

    pl.seed_everything(args.seed, workers=True, verbose=False)
    run_provenance = provenance(NAME, args)
    transforms = [spec(Filter, filter_list=genes)] if genes is not None else []
    transforms.append(spec(GPTTokenizer, var_names_g=var_names_g, context_len=args.context_len,
                           gene_value_vocab_size=args.gene_value_vocab, prompt_fraction=None))
    recipe = {
        "model": spec(
            CellariumGPT,
            categorical_token_size_dict={"gene_id": len(var_names_g), "gene_value": args.gene_value_vocab},
            d_model=args.d_model, d_ffn=args.d_ffn or 2 * args.d_model, n_heads=args.n_heads,
            n_blocks=args.n_blocks, dropout_p=args.dropout, use_bias=True, attention_backend=args.attention_backend,
            attention_softmax_fp32=True, loss_scale_dict={"gene_value": 1.0},
        ),
        "transforms": transforms,
        "data": {"input_var_names_g": collection.var_names_g, "batch_key": args.batch_key},
        "provenance": run_provenance,
    }
    module = CellariumModule.from_recipe(recipe, optim_kwargs={"lr": args.learning_rate}, seed=args.seed)

    fit_and_publish(trainer, module, datamodule, resume_from, args.output, run_provenance)
