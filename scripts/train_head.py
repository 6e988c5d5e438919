import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from snakembed.train import train_head

train_head(
    snakemake.input[0],
    snakemake.config,
    snakemake.output.head,
    snakemake.output.metrics,
    snakemake.output.plot,
)
