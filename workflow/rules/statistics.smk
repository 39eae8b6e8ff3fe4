rule mean_var:
    input:
        shards=shard_inputs,
    output:
        csv=f"{RESULTS}/statistics/mean_var.csv",
        parquet=f"{RESULTS}/statistics/mean_var.parquet",
    log:
        f"{RESULTS}/logs/mean_var.log",
    benchmark:
        f"{RESULTS}/benchmarks/mean_var.tsv"
    threads: 2
    resources:
        mem_mb=2000,
    params:
        shards=shard_args,
        batch_key=batch_key_option(),
        run=run_options(),
        options=step_options("mean_var"),
    shell:
        "cellarium-steps mean-var --input {params.shards} {params.batch_key} --output {output.csv}"
        " {params.run} {params.options} > {log} 2>&1"


rule tdigest:
    input:
        shards=shard_inputs,
    output:
        csv=f"{RESULTS}/statistics/tdigest.csv",
        parquet=f"{RESULTS}/statistics/tdigest.parquet",
    log:
        f"{RESULTS}/logs/tdigest.log",
    benchmark:
        f"{RESULTS}/benchmarks/tdigest.tsv"
    threads: 2
    resources:
        mem_mb=2000,
    params:
        shards=shard_args,
        run=run_options(),
        options=step_options("tdigest"),
    shell:
        "cellarium-steps tdigest --input {params.shards} --output {output.csv}"
        " {params.run} {params.options} > {log} 2>&1"
