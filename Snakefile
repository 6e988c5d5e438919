from snakemake.utils import min_version

min_version("9.0")


# The defaults beside this Snakefile, wherever Snakemake runs (--directory, another folder that
# holds a config.yaml of its own, an installed package); --configfile and --config override them.
configfile: f"{workflow.current_basedir}/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/weights.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/index.smk"
include: "workflow/rules/reduce.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        get_final_outputs(),
