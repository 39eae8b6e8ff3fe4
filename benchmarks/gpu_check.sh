#!/usr/bin/env bash
# The GPU path, end to end: the workflow's CLI chain with --accelerator "$accelerator" on simulated shards,
# the exact PCA on both devices, then CUDA-vs-CPU parity (benchmarks/gpu_parity.py).
#
#   benchmarks/gpu_check.sh [WORKDIR] [N_CELLS]
#
# Prints one line per step with its wall time (start-up included); a step that fails prints the
# end of its log and the script exits non-zero. Results of a run are in docs/benchmarks.md.
set -euo pipefail
work=${1:-gpu_check}
n_cells=${2:-100000}
cli=${CELLARIUM_STEPS:-cellarium-steps}
accelerator=${ACCELERATOR:-gpu}  # cpu: a dry run of this script where there is no GPU
steps=${TRANSFORMER_STEPS:-200}
gpt_backend=${GPT_BACKEND:-flex}
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$work" && mkdir -p "$work"
shards="$work/shards/*.h5ad"

step() {
    local name=$1
    shift
    local start=$EPOCHREALTIME
    if ! "$@" >"$work/$name.log" 2>&1; then
        echo "FAILED $name: $*"
        tail -n 40 "$work/$name.log"
        return 1
    fi
    awk -v n="$name" -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%-24s %8.1f s\n", n, b - a }'
}

step simulate "$cli" simulate --output "$work/shards" --n-cells "$n_cells" --n-genes 3000 --n-batches 4 \
    --n-shards 10 --seed 0 --quiet
step mean_var "$cli" mean-var --input "$shards" --batch-key batch --output "$work/mean_var.csv" --accelerator "$accelerator"
step tdigest "$cli" tdigest --input "$shards" --output "$work/tdigest.csv" --accelerator "$accelerator"
step hvg "$cli" hvg --input "$shards" --batch-key batch --mean-var "$work/mean_var.csv" --n-top-genes 2000 \
    --output "$work/hvg.csv" --accelerator "$accelerator"
step pca_gpu "$cli" pca --input "$shards" --genes "$work/hvg.csv" --output "$work/pca_gpu.parquet" \
    --embeddings "$work/pca_cells" --accelerator "$accelerator"
step pca_cpu "$cli" pca --input "$shards" --genes "$work/hvg.csv" --output "$work/pca_cpu.parquet" --accelerator cpu
step train_scvi_bs1024 "$cli" train-scvi --input "$shards" --batch-key batch --genes "$work/hvg.csv" \
    --max-epochs 3 --batch-size 1024 --num-workers 4 --val-fraction 0.1 --output "$work/scvi.ckpt" --accelerator "$accelerator"
step train_scvi_bs128 "$cli" train-scvi --input "$shards" --batch-key batch --genes "$work/hvg.csv" \
    --max-epochs 1 --batch-size 128 --num-workers 4 --output "$work/scvi128.ckpt" --accelerator "$accelerator"
step predict_scvi "$cli" predict --checkpoint "$work/scvi.ckpt" --input "$shards" --output "$work/scvi_cells" \
    --batch-key batch --num-workers 4 --accelerator "$accelerator"
step train_geneformer "$cli" train-geneformer --input "$shards" --tdigest "$work/tdigest.csv" --max-steps "$steps" \
    --batch-size 64 --output "$work/geneformer.ckpt" --accelerator "$accelerator"
step train_gpt_flex "$cli" train-gpt --input "$shards" --genes "$work/hvg.csv" --max-steps "$steps" --batch-size 64 \
    --attention-backend "$gpt_backend" --output "$work/gpt.ckpt" --accelerator "$accelerator"
grep -h -i "resum\|epoch\|loss" "$work"/train_scvi_bs1024.log | tail -n 5 || true
python3 "$here/gpu_parity.py" --shards "$shards" --pca "$work/pca_gpu.parquet" --pca-cpu "$work/pca_cpu.parquet" \
    ${GPU_PARITY_OPTIONS:-}
