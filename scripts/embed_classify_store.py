import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from snakembed.pipeline import run_shard

run_shard(
    snakemake.params.manifest,
    snakemake.output[0],
    snakemake.config,
    head=(snakemake.input.head or [None])[0],
    threads=snakemake.threads,
)
