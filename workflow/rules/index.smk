rule index:
    input:
        get_folder_files(),
    output:
        f"{RESULTS}/index.h5",
    log:
        f"{RESULTS}/logs/index.log",
    benchmark:
        f"{RESULTS}/benchmarks/index.tsv"
    localrule: True
    conda:
        "../../envs/snakembed.yaml"
    params:
        images=str(PLAN.images),
        folders=list(PLAN.folders),
    script:
        "../../scripts/index.py"
