"""cellarium-steps train-gpt: train a CellariumGPT (prompt -> hidden counts transformer) on raw counts, streamed."""

from __future__ import annotations

import argparse

from cellarium_steps.pipelines.transformers import train_gpt
from cellarium_steps.steps.common import add_common_arguments, call_pipeline, provenance

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


def run(args: argparse.Namespace) -> None:
    call_pipeline(train_gpt, args, provenance=provenance(NAME, args))
