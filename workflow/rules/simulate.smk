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
        directory=lambda wildcards, output: os.path.dirname(output[0]),
        seed=config["seed"],
        options=step_options("simulate"),
    shell:
        "cellarium-steps simulate --output {params.directory:q} --seed {params.seed} {params.options} > {log} 2>&1"
