import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from snakembed.worker import run_folder_served

run_folder_served(
    snakemake.params.manifest,
    snakemake.output[0],
    snakemake.config,
    head=(snakemake.input.head or [None])[0],
    threads=snakemake.threads,
)
