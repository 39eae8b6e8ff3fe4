# SOCAM: an ontology-aware cell type classifier trained on the config's cell_type_key labels, on the
# HVGs (default), the PCA components or the scVI latent means (train_socam.features).
SOCAM_FEATURES = (config.get("train_socam") or {}).get("features", "genes")
SOCAM_FEATURE_INPUTS = {
    "genes": ("--genes", rules.hvg.output.csv),
    "pca": ("--pca", rules.pca.output.model),
    "scvi": ("--scvi", rules.train_scvi.output.checkpoint),
}


rule train_socam:
    input:
        shards=shard_inputs,
        features=SOCAM_FEATURE_INPUTS[SOCAM_FEATURES][1],
    output:
        checkpoint=f"{RESULTS}/socam/socam.ckpt",
        classes=f"{RESULTS}/socam/socam.ckpt.classes.csv",
    log:
        f"{RESULTS}/logs/train_socam.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_socam.tsv"
    threads: 2
    resources:
        **gpu_resources(),
        mem_mb=4000,
    params:
        shards=shard_args,
        cell_type_key=cell_type_key_option(),
        run=run_options(ddp=True),
        launch=launch,
        features=SOCAM_FEATURE_INPUTS[SOCAM_FEATURES][0],
        options=step_options("train_socam", exclude=("features",)),
    shell:
        "{params.launch} cellarium-steps train-socam --input {params.shards} {params.cell_type_key} {params.features} {input.features}"
        " --output {output.checkpoint} {params.run} {params.options} > {log} 2>&1"


rule predict_socam:
    input:
        shards=shard_inputs,
        checkpoint=rules.train_socam.output.checkpoint,
    output:
        cells=directory(f"{RESULTS}/socam/cells.parquet"),
    log:
        f"{RESULTS}/logs/predict_socam.log",
    benchmark:
        f"{RESULTS}/benchmarks/predict_socam.tsv"
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
