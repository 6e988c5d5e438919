rule index:
    input:
        get_shard_records(),
    output:
        update(f"{RESULTS}/index.h5"),
    log:
        f"{RESULTS}/logs/index.log",
    benchmark:
        f"{RESULTS}/benchmarks/index.tsv"
    localrule: True
    conda:
        "../../envs/snakembed.yaml"
    params:
        images=get_images_root,
    script:
        "../../scripts/index.py"
