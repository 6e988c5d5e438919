rule index:
    input:
        get_folder_files(),
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
        folders=get_folder_keys,
    script:
        "../../scripts/index.py"
