import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from snakembed.finetune import finetune

finetune(
    snakemake.config,
    snakemake.output.checkpoint,
    snakemake.output.history,
    threads=snakemake.threads,
)
