rule store:
    input:
        embed=f"{RESULTS}/.work/embed/{{folder}}.npz",
        classify=get_predictions,
    output:
        # update(): the previous file stays readable until the new one is renamed over it.
        update(f"{RESULTS}/embeddings/{{folder}}.h5"),
    log:
        f"{RESULTS}/logs/store/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/store/{{folder}}.tsv"
    conda:
        "../../envs/snakembed.yaml"
    params:
        folder=get_folder_key,
    script:
        "../../scripts/store.py"
