import json
import os

from snakemake.logging import logger
from snakemake.utils import validate

from snakembed.plan import plan_run

# envs/snakembed.yaml installs the library from this checkout (for --sdm conda).
os.environ.setdefault("SNAKEMBED_REPO", workflow.basedir)

# Checks the config (naming every bad key, its value and what is allowed), the plugins and the
# image tree before any job runs; Snakemake's own validation then fills the defaults.
PLAN = plan_run(config)
validate(config, schema="../schemas/config.schema.yaml")
for line in PLAN.warnings():
    logger.warning(line)
RESULTS = str(PLAN.results)
# Intermediate files are removed once used, unless the user keeps them.
KEEP = config["keep_intermediate"]


wildcard_constraints:
    folder=".+",


def work(path):
    """An intermediate file under {results}/.work, temp() unless keep_intermediate."""
    path = f"{RESULTS}/.work/{path}"
    return path if KEEP else temp(path)


def get_final_outputs():
    return [f"{RESULTS}/index.h5", *get_folder_files()]


def get_folder_files():
    return [f"{RESULTS}/embeddings/{stem}.h5" for stem in PLAN.stems]


def get_images_root(wildcards):
    return str(PLAN.images)


def get_folder_keys(wildcards):
    return list(PLAN.folders)


def get_folder_key(wildcards):
    return PLAN.stems[wildcards.folder]


def get_folder_images(wildcards):
    return PLAN.inputs(get_folder_key(wildcards))


def get_untracked_images(wildcards):
    """Images that cannot be inputs (a brace in the path): their size and mtime rerun the job."""
    return PLAN.untracked(get_folder_key(wildcards))


def get_refused_images(wildcards):
    return PLAN.refused(get_folder_key(wildcards))


def get_folder_names(wildcards):
    return PLAN.folders[get_folder_key(wildcards)]


def get_weights_file(wildcards):
    return [PLAN.weights_file] if PLAN.weights_file else []


def get_numbers(wildcards):
    """Everything that changes the embeddings: a change reruns every folder."""
    return json.dumps(PLAN.numbers, sort_keys=True)


def get_head_file():
    """The head, built once per run from the model and kept (it is small)."""
    return f"{RESULTS}/heads/{config['classify']['head']}.npz"


def get_head_settings(wildcards):
    """What the head depends on: a change rebuilds it and reclassifies every folder."""
    settings = {"head": config["classify"]["head"], "model": config["model"]}
    return json.dumps(settings, sort_keys=True)


def get_predictions(wildcards):
    if config["classify"]["head"] == "none":
        return []
    return f"{RESULTS}/.work/classify/{wildcards.folder}.npz"


def get_embed_gpus(wildcards):
    return 1 if config["device"].startswith("cuda") else 0
