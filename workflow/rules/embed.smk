# One job per shard of image folders (see snakembed/shards.py): for each of its folders whose
# images or settings changed, decode, preprocess, patch, embed, classify and store the folder's
# HDF5 file, results/embeddings/{folder}.h5, written as soon as the folder is done. The steps
# share a process (an embed worker's, which keeps the network loaded across shards): each is
# short next to starting one. The output is the shard's record of what it stored.
rule embed_classify_store:
    input:
        weights=get_weights_file,
        head=get_head_file(),
    output:
        f"{RESULTS}/shards/{{shard}}.json",
    log:
        f"{RESULTS}/logs/embed_classify_store/{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed_classify_store/{{shard}}.tsv"
    conda:
        "../../envs/snakembed.yaml"
    threads: config["threads"]
    resources:
        gpu=get_gpus,
        mem_mb=get_shard_mem_mb,
        runtime=get_shard_runtime,
    params:
        manifest=get_shard_manifest,
        images=get_shard_digest,
        numbers=get_numbers,
        classify=get_classify_settings,
    script:
        "../../scripts/embed_classify_store.py"
