rule simulate:
    output:
        directory(DEMO_SHARDS),
    log:
        f"{RESULTS}/logs/simulate.log",
    benchmark:
        f"{RESULTS}/benchmarks/simulate.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        seed=config["seed"],
        options=step_options("simulate"),
    shell:
        "cellarium-steps simulate --output {output} --seed {params.seed} {params.options} > {log} 2>&1"
