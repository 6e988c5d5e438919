import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from snakembed.backbones import fetch_weights

fetch_weights(snakemake.config["model"], snakemake.output[0])
