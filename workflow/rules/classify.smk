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


rule classify:
    input:
        embeddings=f"{RESULTS}/.work/embed/{{folder}}.npz",
        head=get_head_file(),
    output:
        work("classify/{folder}.npz"),
    log:
        f"{RESULTS}/logs/classify/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/classify/{{folder}}.tsv"
    conda:
        "../../envs/snakembed.yaml"
    params:
        topk=config["classify"]["topk"],
    script:
        "../../scripts/classify.py"
