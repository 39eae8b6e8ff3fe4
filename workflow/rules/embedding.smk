# hvg.batch_key (HVG's batches, e.g. the assay) may differ from the global batch_key (training's).
rule hvg:
    input:
        shards=shard_inputs,
        mean_var=rules.mean_var.output.csv if HVG_USES_MEAN_VAR else [],
        # read beside the CSV: an input too, so that a storage plugin stages it
        mean_var_batches=rules.mean_var.output.parquet if HVG_USES_MEAN_VAR else [],
    output:
        csv=f"{RESULTS}/hvg/hvg.csv",
        parquet=f"{RESULTS}/hvg/hvg.parquet",
    log:
        f"{RESULTS}/logs/hvg.log",
    benchmark:
        f"{RESULTS}/benchmarks/hvg.tsv"
    threads: 2
    resources:
        mem_mb=2000,
    params:
        shards=shard_args,
        batch_key=batch_key_option("hvg"),
        mean_var=lambda wildcards, input: (
            f"--mean-var {shlex.quote(input.mean_var)}" if HVG_USES_MEAN_VAR else ""
        ),
        run=run_options(),
        options=step_options("hvg", exclude=("batch_key",)),
    shell:
        "cellarium-steps hvg --input {params.shards} {params.batch_key} {params.mean_var}"
        " --output {output.csv} {params.run} {params.options} > {log} 2>&1"


rule pca:
    input:
        shards=shard_inputs,
        genes=rules.hvg.output.csv,
    output:
        components=f"{RESULTS}/pca/pca.parquet",
        variance=f"{RESULTS}/pca/pca_variance.csv",
        model=f"{RESULTS}/pca/pca.pt",
        cells=directory(f"{RESULTS}/pca/cells.parquet"),
    log:
        f"{RESULTS}/logs/pca.log",
    benchmark:
        f"{RESULTS}/benchmarks/pca.tsv"
    threads: 2
    resources:
        mem_mb=3000,
    params:
        shards=shard_args,
        run=run_options(),
        options=step_options("pca"),
    shell:
        "cellarium-steps pca --input {params.shards} --genes {input.genes} --output {output.components}"
        " --embeddings {output.cells} {params.run} {params.options} > {log} 2>&1"
