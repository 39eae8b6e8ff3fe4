# SOCAM: an ontology-aware cell type classifier trained on the config's cell_type_key labels.
rule train_socam:
    input:
        shards=shard_inputs,
        genes=rules.hvg.output.csv,
    output:
        checkpoint=f"{RESULTS}/socam/socam.ckpt",
        classes=f"{RESULTS}/socam/socam.ckpt.classes.csv",
    log:
        f"{RESULTS}/logs/train_socam.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_socam.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        gpu=1,
    params:
        shards=shard_args,
        cell_type_key=cell_type_key_option(),
        common=common_options(),
        options=step_options("train_socam"),
    shell:
        "cellarium-steps train-socam --input {params.shards} {params.cell_type_key} --genes {input.genes}"
        " --output {output.checkpoint} {params.common} {params.options} > {log} 2>&1"


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
        mem_mb=3000,
        gpu=1,
    params:
        shards=shard_args,
        common=common_options(),
    shell:
        "cellarium-steps predict --checkpoint {input.checkpoint} --input {params.shards}"
        " --output {output.cells} {params.common} > {log} 2>&1"
