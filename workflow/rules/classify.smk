rule head:
    input:
        weights=get_weights_file,
    output:
        get_built_head_file(),
    log:
        f"{RESULTS}/logs/head.log",
    benchmark:
        f"{RESULTS}/benchmarks/head.tsv"
    conda:
        "../../envs/snakembed.yaml"
    params:
        settings=get_head_settings,
    script:
        "../../scripts/head.py"
