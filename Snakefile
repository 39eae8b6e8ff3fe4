# cellarium-steps workflow: raw-count shards -> statistics -> HVG -> PCA -> models -> Parquet.
# Rules live in workflow/rules/*.smk; each calls one `cellarium-steps` step and holds no science.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/statistics.smk"


rule all:
    input:
        rules.mean_var.output,
        rules.tdigest.output,
    default_target: True


rule statistics:
    input:
        rules.mean_var.output,
        rules.tdigest.output,
