# Geneformer: a BERT over rank-value encoded cells (genes by decreasing count / total / non-zero
# median from the tdigest step), trained by masked language modelling. Not part of `all`:
# `snakemake geneformer` builds it.
rule train_geneformer:
    input:
        shards=shard_inputs,
        tdigest=rules.tdigest.output.csv,
    output:
        checkpoint=f"{RESULTS}/geneformer/geneformer.ckpt",
    log:
        f"{RESULTS}/logs/train_geneformer.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_geneformer.tsv"
    threads: 2
    resources:
        **gpu_resources(),
        mem_mb=4000,
    params:
        shards=shard_args,
        run=run_options(ddp=True),
        launch=launch,
        options=step_options("train_geneformer"),
    shell:
        "{params.launch} cellarium-steps train-geneformer --input {params.shards} --tdigest {input.tdigest}"
        " --output {output.checkpoint} {params.run} {params.options} > {log} 2>&1"


# CellariumGPT: a transformer that predicts the hidden counts of a cell's query genes from a prompt
# of its other genes; the HVG genes are its vocabulary. Not part of `all`: `snakemake gpt` builds it.
rule train_gpt:
    input:
        shards=shard_inputs,
        genes=rules.hvg.output.csv,
    output:
        checkpoint=f"{RESULTS}/gpt/gpt.ckpt",
    log:
        f"{RESULTS}/logs/train_gpt.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_gpt.tsv"
    threads: 2
    resources:
        **gpu_resources(),
        mem_mb=4000,
    params:
        shards=shard_args,
        run=run_options(ddp=True),
        launch=launch,
        options=step_options("train_gpt"),
    shell:
        "{params.launch} cellarium-steps train-gpt --input {params.shards} --genes {input.genes}"
        " --output {output.checkpoint} {params.run} {params.options} > {log} 2>&1"
