# The pages of `snakemake --report report.html` (report.enabled), made from the whole store.
rule report_pages:
    input:
        index=f"{RESULTS}/index.h5",
        metrics=get_head_metrics(),
    output:
        summary=report(
            f"{RESULTS}/report/summary.html",
            caption="../report/summary.rst",
            category="Summary",
        ),
        labels=report(
            f"{RESULTS}/report/labels.png",
            caption="../report/labels.rst",
            category="Labels",
        ),
        map=report(
            f"{RESULTS}/report/map.html",
            caption="../report/map.rst",
            category="Embeddings",
        ),
        neighbours=report(
            f"{RESULTS}/report/neighbours.html",
            caption="../report/neighbours.rst",
            category="Embeddings",
        ),
    log:
        f"{RESULTS}/logs/report_pages.log",
    benchmark:
        f"{RESULTS}/benchmarks/report_pages.tsv"
    localrule: True
    conda:
        "../../envs/snakembed.yaml"
    params:
        points=config["report"]["points"],
        queries=config["report"]["queries"],
    script:
        "../../scripts/report_pages.py"
