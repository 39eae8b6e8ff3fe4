# `convert: true`: the input rewritten as uncompressed CSR shards (CONVERTED_SHARDS), which every rule then
# reads through shard_inputs/shard_args (common.smk). Not run otherwise: nothing asks for its output.


rule convert_shards:
    input:
        shards=input_shards,
    output:
        directory(CONVERTED_SHARDS),
    log:
        f"{RESULTS}/logs/convert_shards.log",
    benchmark:
        f"{RESULTS}/benchmarks/convert_shards.tsv"
    threads: 1
    resources:
        mem_mb=3000,
    params:
        shards=input_shard_args,
        batch_key=batch_key_option(),
        run=run_options(),
        data=" ".join(shlex.quote(o) for o in data_options(for_convert=True)),
        obs_columns=convert_obs_columns(),
        options=step_options("convert_shards", exclude=("obs_columns",)),
    shell:
        "cellarium-steps convert --input {params.shards} {params.batch_key} --output {output}"
        " {params.run} {params.data} {params.obs_columns} {params.options} > {log} 2>&1"
