import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from snakembed.embed import embed_folder

embed_folder(
    snakemake.params.images,
    snakemake.params.folder,
    snakemake.params.names,
    snakemake.output[0],
    snakemake.config,
    threads=snakemake.threads,
    refused=snakemake.params.refused,
)
