# cellarium-steps workflow: raw-count shards -> statistics -> HVG -> PCA -> models -> Parquet.
# Rules live in workflow/rules/*.smk; each calls one `cellarium-steps` step and holds no science.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/config.smk"


validate(config, "workflow/schemas/config.schema.yaml")


# `snakemake --report report.html` (after a run): this page, the plots of rule report_plots, runtimes.
report: "workflow/report/workflow.rst"


# Used only when a profile asks for containers (software-deployment-method: apptainer).
container: config["container"]


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/statistics.smk"
include: "workflow/rules/embedding.smk"
include: "workflow/rules/scvi.smk"
include: "workflow/rules/celltype.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/transformers.smk"
include: "workflow/rules/query_common.smk"
include: "workflow/rules/query.smk"


# Every product is listed (not only the export and the plots, which depend on the rest), so that
# deleting any one intermediate output reruns its job and what depends on it.
rule all:
    default_target: True
    input:
        rules.mean_var.output,
        rules.tdigest.output,
        rules.hvg.output,
        rules.pca.output,
        rules.train_scvi.output,
        rules.predict_scvi.output,
        rules.train_socam.output if SOCAM else [],
        rules.predict_socam.output if SOCAM else [],
        rules.export.output,
        rules.report_plots.output,


rule statistics:
    input:
        rules.mean_var.output,
        rules.tdigest.output,


rule embedding:
    input:
        rules.hvg.output,
        rules.pca.output,


rule scvi:
    input:
        rules.predict_scvi.output,


rule celltype:
    input:
        rules.predict_socam.output,


# Optional, not in `all`: config query.input mapped onto the reference (train-scvi --reference), its cell
# types transferred, exported (results/query/export) and reported beside the reference.
rule query:
    input:
        rules.query_export.output,
        rules.query_report.output,


# Optional, not in `all`: a Geneformer trained on the shards.
rule geneformer:
    input:
        rules.train_geneformer.output,


# Optional, not in `all`: a CellariumGPT trained on the shards (HVG genes as its vocabulary).
rule gpt:
    input:
        rules.train_gpt.output,
