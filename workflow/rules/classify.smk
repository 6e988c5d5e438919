rule classify:
    input:
        f"{RESULTS}/.work/embed/{{folder}}.npz",
    output:
        work("classify/{folder}.npz"),
    log:
        f"{RESULTS}/logs/classify/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/classify/{{folder}}.tsv"
    conda:
        "../../envs/snakembed.yaml"
    params:
        settings=get_classify_settings,
    script:
        "../../scripts/classify.py"
