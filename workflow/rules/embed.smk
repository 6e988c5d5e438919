# One job per image folder: decode, preprocess, patch, embed, classify and store its HDF5 file.
# The steps share a process (an embed worker's, which keeps the network loaded across folders):
# each is short next to starting one.
rule embed_classify_store:
    input:
        weights=get_weights_file,
        head=get_head_file(),
    output:
        # update(): the previous file stays readable until the new one is renamed over it, and
        # lends the embeddings of the images that did not change.
        update(f"{RESULTS}/embeddings/{{folder}}.h5"),
    log:
        f"{RESULTS}/logs/embed_classify_store/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed_classify_store/{{folder}}.tsv"
    conda:
        "../../envs/snakembed.yaml"
    threads: config["threads"]
    resources:
        gpu=get_gpus,
        mem_mb=get_folder_mem_mb,
        runtime=get_folder_runtime,
    params:
        manifest=get_folder_manifest,
        images=get_folder_digest,
        numbers=get_numbers,
        classify=get_classify_settings,
    script:
        "../../scripts/embed_classify_store.py"
