import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from pathlib import Path

from snakembed.reduce import reduce_store

# The output is {results}/reduced.h5.
reduce_store(Path(snakemake.output[0]).parent, snakemake.output[0], snakemake.params.dim)
