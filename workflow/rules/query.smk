# Reference mapping (`snakemake query`): the query shards mapped onto the reference's scVI (train-scvi
# --reference), their cell types transferred with the reference's SOCAM, exported and reported beside
# the reference. The reference is this run's results (built if needed) or an earlier run's (query.reference);
# the config keys and input functions are in query_common.smk.
rule query_train_scvi:
    input:
        shards=query_shards,
        reference=REFERENCE_SCVI,
    output:
        checkpoint=f"{QUERY_RESULTS}/scvi/scvi.ckpt",
        metrics=f"{QUERY_RESULTS}/scvi/scvi.ckpt.metrics.csv",
    log:
        f"{RESULTS}/logs/query_train_scvi.log",
    benchmark:
        f"{RESULTS}/benchmarks/query_train_scvi.tsv"
    threads: 2
    resources:
        **gpu_resources(),
        mem_mb=4000,
    params:
        shards=input_shard_args,  # the staged query shards
        batch_key=query_batch_key_option(),
        genes=query_gene_options(),
        run=run_options(ddp=True),
        launch=launch,
        options=step_options("query_train_scvi", section=QUERY.get("train_scvi") or {}),
    shell:
        "{params.launch} cellarium-steps train-scvi --reference {input.reference} --input {params.shards} {params.batch_key}"
        " {params.genes} --output {output.checkpoint} {params.run} {params.options} > {log} 2>&1"


rule query_predict_scvi:
    input:
        shards=query_shards,
        checkpoint=rules.query_train_scvi.output.checkpoint,
    output:
        cells=directory(f"{QUERY_RESULTS}/scvi/cells.parquet"),
    log:
        f"{RESULTS}/logs/query_predict_scvi.log",
    benchmark:
        f"{RESULTS}/benchmarks/query_predict_scvi.tsv"
    threads: 2
    resources:
        **gpu_resources(),
        mem_mb=3000,
    params:
        shards=input_shard_args,  # the staged query shards
        genes=query_gene_options(),
        run=run_options(ddp=True),
        launch=launch,
    shell:
        "{params.launch} cellarium-steps predict --checkpoint {input.checkpoint} --input {params.shards} {params.genes}"
        " --output {output.cells} {params.run} > {log} 2>&1"


# SOCAM on genes or PCA components reads the query's genes; on the scVI latent (train_socam.features: scvi,
# as the reference was trained) it reads the latent of the mapped query checkpoint.
rule query_predict_socam:
    input:
        shards=query_shards,
        checkpoint=REFERENCE_SOCAM,
        scvi=rules.query_train_scvi.output.checkpoint,
    output:
        cells=directory(f"{QUERY_RESULTS}/socam/cells.parquet"),
    log:
        f"{RESULTS}/logs/query_predict_socam.log",
    benchmark:
        f"{RESULTS}/benchmarks/query_predict_socam.tsv"
    threads: 2
    resources:
        **gpu_resources(),
        mem_mb=3000,
    params:
        shards=input_shard_args,  # the staged query shards
        genes=query_gene_options(),
        features=lambda wildcards, input: (
            f"--features-from {shlex.quote(input.scvi)}"
            if SOCAM_FEATURES == "scvi"
            else ""
        ),
        run=run_options(ddp=True),
        launch=launch,
    shell:
        "{params.launch} cellarium-steps predict --checkpoint {input.checkpoint} {params.features} --input {params.shards}"
        " {params.genes} --output {output.cells} {params.run} > {log} 2>&1"


rule query_export:
    input:
        shards=query_shards,
        scvi=rules.query_predict_scvi.output.cells,
        socam=rules.query_predict_socam.output.cells if QUERY_SOCAM else [],
    output:
        cells=directory(f"{QUERY_RESULTS}/export/cells.parquet"),
    log:
        f"{RESULTS}/logs/query_export.log",
    benchmark:
        f"{RESULTS}/benchmarks/query_export.tsv"
    threads: 1
    resources:
        mem_mb=3000,
    params:
        shards=input_shard_args,  # the staged query shards
        batch_key=query_batch_key_option(),
        dataset=QUERY.get("dataset") or "query",
        seed=config["seed"],
    shell:
        "cellarium-steps export --input {params.shards} {params.batch_key} --cells {input.scvi} {input.socam}"
        " --dataset {params.dataset:q} --output {output.cells} --seed {params.seed} > {log} 2>&1"


rule query_report:
    input:
        reference=REFERENCE_EXPORT,
        query=rules.query_export.output.cells,
    output:
        latent=report(
            f"{QUERY_RESULTS}/report/query_latent_by_dataset.png",
            caption="../report/query_latent_by_dataset.rst",
            category="5. Query",
        ),
        cell_type=report(
            f"{QUERY_RESULTS}/report/query_latent_by_cell_type.png",
            caption="../report/query_latent_by_cell_type.rst",
            category="5. Query",
        ),
        composition=report(
            f"{QUERY_RESULTS}/report/query_cell_type_composition.png",
            caption="../report/query_cell_type_composition.rst",
            category="5. Query",
        ),
    log:
        f"{RESULTS}/logs/query_report.log",
    benchmark:
        f"{RESULTS}/benchmarks/query_report.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        directory=lambda wildcards, output: os.path.dirname(output.latent),
        seed=config["seed"],
        options=step_options("report"),
    shell:
        "cellarium-steps report --cells {input.reference} --query-cells {input.query} --seed {params.seed}"
        " --output {params.directory} {params.options} > {log} 2>&1"
