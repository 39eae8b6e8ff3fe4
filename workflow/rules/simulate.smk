rule simulate:
    output:
        demo_shards(),
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
        "cellarium-steps simulate --output $(dirname {output[0]:q}) --seed {params.seed} {params.options} > {log} 2>&1"
