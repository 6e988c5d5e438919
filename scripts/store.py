import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from snakembed.store import store_folder

store_folder(
    snakemake.input.embed,
    snakemake.input.classify or None,
    snakemake.output[0],
    snakemake.params.folder,
)
