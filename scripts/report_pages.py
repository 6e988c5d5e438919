import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from pathlib import Path

from snakembed.report import write_report_pages

# The index is {results}/index.h5.
write_report_pages(
    Path(snakemake.input.index).parent,
    snakemake.output.summary,
    snakemake.output.labels,
    snakemake.output.map,
    snakemake.output.neighbours,
    points=snakemake.params.points,
    queries=snakemake.params.queries,
    metrics=(snakemake.input.metrics or [None])[0],
)
