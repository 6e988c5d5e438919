rule weights_fetch:
    output:
        get_fetched_weights(),
    log:
        f"{RESULTS}/logs/weights_fetch.log",
    benchmark:
        f"{RESULTS}/benchmarks/weights_fetch.tsv"
    # Runs where the workflow is started (a cluster's login node has internet, its compute
    # nodes often do not), once, before any job that needs the weights.
    localrule: True
    conda:
        "../../envs/snakembed.yaml"
    params:
        model=get_model_settings,
    script:
        "../../scripts/weights_fetch.py"
