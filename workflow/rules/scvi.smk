rule train_scvi:
    input:
        shards=shard_inputs,
        genes=rules.hvg.output.csv,
    output:
        checkpoint=f"{RESULTS}/scvi/scvi.ckpt",
        metrics=f"{RESULTS}/scvi/scvi.ckpt.metrics.csv",
    log:
        f"{RESULTS}/logs/train_scvi.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_scvi.tsv"
    threads: 2
    resources:
        **gpu_resources(),
        mem_mb=4000,
    params:
        shards=shard_args,
        batch_key=batch_key_option(),
        run=run_options(ddp=True),
        launch=launch,
        options=step_options("train_scvi"),
    shell:
        "{params.launch} cellarium-steps train-scvi --input {params.shards} {params.batch_key} --genes {input.genes}"
        " --output {output.checkpoint} {params.run} {params.options} > {log} 2>&1"


rule predict_scvi:
    input:
        shards=shard_inputs,
        checkpoint=rules.train_scvi.output.checkpoint,
    output:
        cells=directory(f"{RESULTS}/scvi/cells.parquet"),
    log:
        f"{RESULTS}/logs/predict_scvi.log",
    benchmark:
        f"{RESULTS}/benchmarks/predict_scvi.tsv"
    threads: 2
    resources:
        **gpu_resources(),
        mem_mb=3000,
    params:
        shards=shard_args,
        run=run_options(ddp=True),
        launch=launch,
    shell:
        "{params.launch} cellarium-steps predict --checkpoint {input.checkpoint} --input {params.shards}"
        " --output {output.cells} {params.run} > {log} 2>&1"
