rule embed_labels:
    input:
        images=get_labelled_images,
        weights=get_weights_file,
    output:
        get_labelled_embeddings(),
    log:
        f"{RESULTS}/logs/embed_labels.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed_labels.tsv"
    conda:
        "../../envs/snakembed.yaml"
    threads: config["threads"]
    resources:
        gpu=get_gpus,
    params:
        numbers=get_numbers,
        labelled=get_labelled_identity,
    script:
        "../../scripts/embed_labels.py"


rule train_head:
    input:
        get_labelled_embeddings(),
    output:
        head=f"{get_trained_head_dir()}/head.npz",
        metrics=f"{get_trained_head_dir()}/metrics.json",
        plot=report(
            f"{get_trained_head_dir()}/confusion.png",
            caption="../report/confusion.rst",
            category="Trained head",
        ),
    log:
        f"{RESULTS}/logs/train_head.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_head.tsv"
    conda:
        "../../envs/snakembed.yaml"
    resources:
        gpu=get_gpus,
    params:
        settings=get_head_settings,
    script:
        "../../scripts/train_head.py"


rule finetune:
    input:
        images=get_labelled_images,
        weights=get_finetune_weights,
    output:
        checkpoint=f"{RESULTS}/{FINETUNE_CHECKPOINT}",
        history=f"{RESULTS}/finetune/history.json",
    log:
        f"{RESULTS}/logs/finetune.log",
    benchmark:
        f"{RESULTS}/benchmarks/finetune.tsv"
    conda:
        "../../envs/snakembed.yaml"
    threads: config["threads"]
    resources:
        gpu=get_gpus,
    params:
        settings=get_finetune_settings,
        labelled=get_labelled_identity,
    script:
        "../../scripts/finetune.py"
