# One streaming pass joins every model's per-cell output with the shards' obs: a Hive-partitioned
# Parquet dataset (dataset=<name>/batch=<batch>/) and the per-gene table beside it.
rule export:
    input:
        shards=shard_inputs,
        pca=rules.pca.output.cells,
        scvi=rules.predict_scvi.output.cells,
        socam=rules.predict_socam.output.cells if SOCAM else [],
        mean_var=rules.mean_var.output.csv,
        hvg=rules.hvg.output.csv,
    output:
        cells=directory(f"{RESULTS}/export/cells.parquet"),
        genes=f"{RESULTS}/export/genes.parquet",
    log:
        f"{RESULTS}/logs/export.log",
    benchmark:
        f"{RESULTS}/benchmarks/export.tsv"
    threads: 1
    resources:
        mem_mb=3000,
    params:
        batch_key=batch_key_option(),
        dataset=lambda wildcards: export_dataset(),
        options=step_options("export", exclude=("dataset",)),
    shell:
        "cellarium-steps export --input {input.shards:q} {params.batch_key} --cells {input.pca} {input.scvi}"
        " {input.socam} --dataset {params.dataset:q} --mean-var {input.mean_var} --hvg {input.hvg}"
        " --genes-output {output.genes} --output {output.cells} {params.options} > {log} 2>&1"
