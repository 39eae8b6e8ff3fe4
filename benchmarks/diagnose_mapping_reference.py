"""Diagnostic for bench_mapping.py: map the query from one and the same reference on both sides.

    .venv/bin/python benchmarks/diagnose_mapping_reference.py --seed 0

bench_mapping.py trains each side's own reference, so a gap in label transfer can come from the
reference or from the query training. Here scvi-tools trains the reference (bench_mapping's settings
and data, cached by it under ``benchmarks/out/mapping``; run it once first), its weights are written
into one of our reference checkpoints (same architecture; the latent must agree exactly), and the
query is mapped from it by scvi-tools' ``load_query_data`` + ``train`` and by our
``train-scvi --reference``. Also printed: each reference's own integration, a 15-NN label transfer
between its two sources in both directions, for our reference of the same seed and scvi-tools'.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))  # the scvi-tools -> ours weight map of the parity tests
import bench_mapping as bm  # noqa: E402
from _harness import OUT_DIR, cellarium_steps_exe  # noqa: E402


def between_sources(z_nk: np.ndarray, labels_n: np.ndarray, source_n: np.ndarray) -> str:
    a, b = (source_n == s for s in bm.REFERENCE_SOURCES)
    ab = bm.mapping_metrics(z_nk[a], labels_n[a], z_nk[b], labels_n[b])["accuracy"]
    ba = bm.mapping_metrics(z_nk[b], labels_n[b], z_nk[a], labels_n[a])["accuracy"]
    return f"{ab:.4f} / {ba:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the seed (ours_seed<N> of bench_mapping must exist)")
    parser.add_argument("--epochs", type=int, default=100, help="reference and query epochs (default: 100)")
    args = parser.parse_args(argv)

    import scvi
    import torch
    from scvi_tools_parity import scvi_tools_state_to_ours

    from cellarium_steps.runner import CellariumModule

    torch.set_num_threads(1)
    data_dir = OUT_DIR / "mapping"
    ours_reference = data_dir / f"ours_seed{args.seed}" / "reference.ckpt"
    if not ours_reference.is_file():
        sys.exit(f"{ours_reference} not found: run benchmarks/bench_mapping.py first")
    genes = (data_dir / "hvg.txt").read_text().split()
    reference, query = bm.load(str(data_dir / "reference.h5ad"), genes), bm.load(str(data_dir / "query.h5ad"), genes)
    labels_r = reference.obs[bm.LABEL_KEY].astype(str).to_numpy()
    labels_q = query.obs[bm.LABEL_KEY].astype(str).to_numpy()
    source_r = reference.obs[bm.BATCH_KEY].astype(str).to_numpy()

    model = bm.scvi_reference_model(reference, args.seed)
    model.train(max_epochs=args.epochs, plan_kwargs=bm.scvi_plan_kwargs(bm.warmup_steps(reference.n_obs, args.epochs)),
                **bm.SCVI_TRAIN_KWARGS)

    # scvi-tools' reference weights in our checkpoint of the same architecture
    checkpoint = torch.load(ours_reference, weights_only=False)
    module = CellariumModule.from_checkpoint(str(ours_reference))
    module.model.load_state_dict(scvi_tools_state_to_ours(model.module, module.model, bm.N_LAYERS))
    checkpoint["state_dict"].update({f"model.{k}": v for k, v in module.model.state_dict().items()})
    run_dir = data_dir / f"same_reference_seed{args.seed}"
    run_dir.mkdir(exist_ok=True)
    shared_reference, our_query = run_dir / "reference.ckpt", run_dir / "query.ckpt"
    torch.save(checkpoint, shared_reference)
    difference = np.abs(bm._latent(str(shared_reference), reference) - model.get_latent_representation(reference))
    print(f"shared reference: latent max |ours - scvi-tools| = {difference.max():.2e}")
    print("label transfer between the reference's two sources (A->B / B->A):")
    print(f"  our reference (seed {args.seed}):        "
          f"{between_sources(bm._latent(str(ours_reference), reference), labels_r, source_r)}")
    print(f"  scvi-tools' reference (seed {args.seed}): "
          f"{between_sources(model.get_latent_representation(reference), labels_r, source_r)}")

    query_warmup = bm.warmup_steps(query.n_obs, args.epochs)
    mapped = scvi.model.SCVI.load_query_data(query.copy(), model)
    mapped.train(max_epochs=args.epochs, plan_kwargs=bm.scvi_plan_kwargs(query_warmup, query=True),
                 **bm.SCVI_TRAIN_KWARGS)
    theirs = bm.mapping_metrics(mapped.get_latent_representation(reference), labels_r,
                                mapped.get_latent_representation(query), labels_q)
    subprocess.run([cellarium_steps_exe(), *bm.ours_query_args(
        str(shared_reference), str(data_dir / "query.h5ad"), str(our_query), args.epochs, query_warmup, args.seed)],
        check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ours = bm.mapping_metrics(bm._latent(str(our_query), reference), labels_r, bm._latent(str(our_query), query),
                              labels_q)
    print("query mapped from the shared reference:")
    for name, result in (("scvi-tools", theirs), ("cellarium-steps", ours)):
        print(f"  {name:16s} accuracy {result['accuracy']:.4f}  mixing {result['mixing']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
