import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from snakembed.store import index_shards

index_shards(snakemake.input, snakemake.params.images, snakemake.output[0])
