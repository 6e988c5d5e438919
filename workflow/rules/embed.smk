rule embed:
    input:
        images=get_folder_images,
        weights=get_weights_file,
    output:
        work("embed/{folder}.npz"),
    log:
        f"{RESULTS}/logs/embed/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{folder}}.tsv"
    conda:
        "../../envs/snakembed.yaml"
    threads: config["threads"]
    resources:
        gpu=get_gpus,
    params:
        images=get_images_root,
        folder=get_folder_key,
        names=get_folder_names,
        refused=get_refused_images,
        untracked=get_untracked_images,
        numbers=get_numbers,
    script:
        "../../scripts/embed.py"
