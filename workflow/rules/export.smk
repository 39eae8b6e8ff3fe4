# One streaming pass joins every model's per-cell output with the shards' obs: a Hive-partitioned
# Parquet dataset (dataset=<name>/batch=<batch>/) and the per-gene table beside it; with
# export.anndata, in the same pass, one .h5ad per shard (obs, var, obsm latents) in export/anndata/.
EXPORT_ANNDATA = bool((config.get("export") or {}).get("anndata"))


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
        anndata=directory(f"{RESULTS}/export/anndata") if EXPORT_ANNDATA else [],
    log:
        f"{RESULTS}/logs/export.log",
    benchmark:
        f"{RESULTS}/benchmarks/export.tsv"
    threads: 1
    resources:
        mem_mb=3000,
    params:
        shards=shard_args,
        batch_key=batch_key_option(),
        dataset=lambda wildcards: export_dataset(),
        anndata=lambda wildcards, output: (
            f"--anndata {shlex.quote(output.anndata)}" if EXPORT_ANNDATA else ""
        ),
        seed=config["seed"],
        data=" ".join(shlex.quote(o) for o in data_options()),
        options=step_options("export", exclude=("dataset", "anndata")),
    shell:
        "cellarium-steps export --input {params.shards} {params.batch_key} --cells {input.pca} {input.scvi}"
        " {input.socam} --dataset {params.dataset:q} --mean-var {input.mean_var} --hvg {input.hvg}"
        " --genes-output {output.genes} --output {output.cells} {params.anndata} --seed {params.seed}"
        " {params.data} {params.options} > {log} 2>&1"
