# The first-look plots; `snakemake --report report.html` collects them with their captions.
rule report_plots:
    input:
        hvg=rules.hvg.output.csv,
        pca_variance=rules.pca.output.variance,
        scvi_metrics=rules.train_scvi.output.metrics,
        cells=rules.export.output.cells,
    output:
        hvg=report(
            f"{RESULTS}/report/hvg_mean_variance.png",
            caption="../report/hvg_mean_variance.rst",
            category="1. Genes",
        ),
        pca=report(
            f"{RESULTS}/report/pca_variance.png",
            caption="../report/pca_variance.rst",
            category="2. PCA",
        ),
        scvi_loss=report(
            f"{RESULTS}/report/scvi_loss.png",
            caption="../report/scvi_loss.rst",
            category="3. scVI",
        ),
        latent_batch=report(
            f"{RESULTS}/report/latent_by_batch.png",
            caption="../report/latent_by_batch.rst",
            category="3. scVI",
        ),
        latent_cell_type=report(
            f"{RESULTS}/report/latent_by_cell_type.png",
            caption="../report/latent_by_cell_type.rst",
            category="4. Cell types",
        ),
        composition=report(
            f"{RESULTS}/report/cell_type_composition.png",
            caption="../report/cell_type_composition.rst",
            category="4. Cell types",
        ),
    log:
        f"{RESULTS}/logs/report_plots.log",
    benchmark:
        f"{RESULTS}/benchmarks/report_plots.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        directory=lambda wildcards, output: os.path.dirname(output.hvg),
        seed=config["seed"],
        options=step_options("report"),
    shell:
        "cellarium-steps report --hvg {input.hvg} --pca-variance {input.pca_variance}"
        " --scvi-metrics {input.scvi_metrics} --cells {input.cells} --seed {params.seed}"
        " --output {params.directory} {params.options} > {log} 2>&1"
