rule simulate:
    output:
        directory(DEMO_SHARDS),
    log:
        f"{RESULTS}/logs/simulate.log",
    benchmark:
        f"{RESULTS}/benchmarks/simulate.tsv"
    params:
        options=step_options("simulate"),
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "cellarium-steps simulate --output {output} --seed {config[seed]} {params.options} > {log} 2>&1"
