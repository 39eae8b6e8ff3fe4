# The query target's config keys and input functions (its rules are in query.smk): no science, only wiring.
QUERY = config.get("query") or {}
QUERY_RESULTS = f"{RESULTS}/query"
REFERENCE_RESULTS = QUERY.get("reference") or RESULTS
REFERENCE_SCVI = QUERY.get("scvi_checkpoint") or f"{REFERENCE_RESULTS}/scvi/scvi.ckpt"
REFERENCE_SOCAM = (
    QUERY.get("socam_checkpoint") or f"{REFERENCE_RESULTS}/socam/socam.ckpt"
)
REFERENCE_EXPORT = f"{REFERENCE_RESULTS}/export/cells.parquet"
QUERY_SOCAM = SOCAM or bool(QUERY.get("socam_checkpoint"))


def query_shards(wildcards=None):
    shards = expand_shards(QUERY.get("input"), key="query.input")
    if not shards:
        raise WorkflowError(
            "the query target needs query.input in the config: the query's .h5ad shards"
        )
    return shards


def query_batch_key_option():
    """query.batch_key (a column or a list of columns), else the global batch_key."""
    return batch_key_option("query")


def query_gene_options():
    return step_options(
        "query",
        section={
            "missing_genes": QUERY.get("missing_genes", "zero"),
            "max_missing_genes_fraction": QUERY.get("max_missing_genes_fraction"),
        },
    )
