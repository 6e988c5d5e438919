# Optional (reduce.method): PCA fitted on every folder's embeddings, reduced vectors beside them.
rule reduce:
    input:
        # the folders come from the index: it must be up to date first
        index=f"{RESULTS}/index.h5",
        shards=get_shard_records(),
    output:
        f"{RESULTS}/reduced.h5",
    log:
        f"{RESULTS}/logs/reduce.log",
    benchmark:
        f"{RESULTS}/benchmarks/reduce.tsv"
    localrule: True
    conda:
        "../../envs/snakembed.yaml"
    params:
        dim=config["reduce"]["dim"],
    script:
        "../../scripts/reduce.py"
