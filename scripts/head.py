import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from snakembed.classify import build_head

build_head(snakemake.config, snakemake.output[0])
