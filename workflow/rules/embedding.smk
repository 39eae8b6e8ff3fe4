rule hvg:
    input:
        shards=shard_inputs,
        mean_var=rules.mean_var.output.csv,
        # read beside the CSV: an input too, so that a storage plugin stages it
        mean_var_batches=rules.mean_var.output.parquet,
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
        batch_key=batch_key_option(),
        run=run_options(),
        options=step_options("hvg"),
    shell:
        "cellarium-steps hvg --input {input.shards:q} {params.batch_key} --mean-var {input.mean_var}"
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
        run=run_options(),
        options=step_options("pca"),
    shell:
        "cellarium-steps pca --input {input.shards:q} --genes {input.genes} --output {output.components}"
        " --embeddings {output.cells} {params.run} {params.options} > {log} 2>&1"
