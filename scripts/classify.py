import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from snakembed.classify import classify_folder

classify_folder(
    snakemake.input.embeddings, snakemake.input.head, snakemake.output[0], snakemake.config
)
