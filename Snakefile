# cellarium-steps workflow: raw-count shards -> statistics -> HVG -> PCA -> models -> Parquet.
# Rules live in workflow/rules/*.smk; each calls one `cellarium-steps` step and holds no science.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


# Used only when a profile asks for containers (software-deployment-method: apptainer).
container: config["container"]


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/statistics.smk"
include: "workflow/rules/embedding.smk"
include: "workflow/rules/scvi.smk"


rule all:
    default_target: True
    input:
        rules.mean_var.output,
        rules.tdigest.output,
        rules.pca.output,
        rules.predict_scvi.output,


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
