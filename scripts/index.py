import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from snakembed.store import write_index

write_index(
    snakemake.params.folders,
    snakemake.params.images,
    snakemake.output[0],
)
