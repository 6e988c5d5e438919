import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from snakembed.train import embed_labelled

embed_labelled(snakemake.config, snakemake.output[0], threads=snakemake.threads)
