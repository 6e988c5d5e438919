import json
import os
import threading

from snakemake.logging import logger
from snakemake.utils import validate

from snakembed.backbones import is_local_weights, needs_fetch
from snakembed.config import unused_model_keys
from snakembed.heads import needs_labels
from snakembed.plan import FINETUNE_CHECKPOINT, FOLDER_RULE, asks_for_gpu, plan_run
from snakembed.shards import failed_images
from snakembed.worker import prestart

# envs/snakembed.yaml installs the library from this checkout (for --sdm conda): the folder of
# this workflow's Snakefile (workflow.basedir is the importing workflow's in a module).
os.environ.setdefault(
    "SNAKEMBED_REPO", os.path.normpath(f"{workflow.current_basedir}/../..")
)

# Imported as a Snakemake module (`use rule * from snakembed as snakembed_*`), the rules have
# the importing workflow's names (snakembed_embed_classify_store), and the module's name is
# where that workflow reaches this file's functions (snakembed.start_run); None in a plain run.
FOLDER_RULE_NAME = workflow.modifier.modify_rulename(FOLDER_RULE)
MODULE_NAME = workflow.modifier.namespace

# Checks the config (naming every bad key, its value and what is allowed), the plugins and the
# image tree before any job runs, and resolves device and precision (`auto`) for the whole run;
# Snakemake's own validation then fills the defaults. A cluster job's Snakemake reads the
# folders from the manifests instead of walking the tree again, and the device and precision
# from what the planning process resolved.
UNUSED = unused_model_keys(config)
PLAN = plan_run(
    config,
    discover=workflow.is_main_process,
    gpu_jobs=asks_for_gpu(
        workflow.resource_settings.overwrite_resources.get(FOLDER_RULE_NAME, {})
    ),
    # a local run's cores (None without --cores: a dry run, a cluster run)
    cores=workflow._cores if workflow.local_exec else None,
)
validate(config, schema="../schemas/config.schema.yaml")
for line in PLAN.warnings():
    logger.warning(line)
RESULTS = str(PLAN.results)

# Each shard's manifest is rewritten where its folders' images or settings changed (a dry run
# too, so that it reports them); its checksum is a parameter of the shard's job. A shard's
# record that no longer matches its folders' files is removed, so that the shard runs again.
if workflow.is_main_process:
    for key in UNUSED:
        logger.warning(f"{key} is only used with model.name: custom; ignored")
    PLAN.write_manifests()
    logger.info(f"snakembed: {PLAN.changes.line()}")
    when = (
        f", if the workflow's onstart calls {MODULE_NAME}.start_run()"
        if MODULE_NAME
        else ""
    )
    for line in PLAN.stale_lines(PLAN.stale_files(), when):
        logger.info(line)


wildcard_constraints:
    shard=r"\d+-of-\d+",


# Only when jobs are about to run: never for a dry run, --lint, --unlock, --summary, --report
# or a run with nothing to do. Snakemake (9.17 and later) runs no onstart handler of a module:
# a workflow that imports this one calls start_run from its own (see start_run).
onstart:
    start_run()


def start_run():
    """Remove the results of folders that are no longer in the image tree, and on a local run
    start the embed worker when folder jobs will run, so that it loads its network while
    Snakemake starts them.

    A workflow that imports this one as a module calls it from its own onstart handler::

        onstart:
            snakembed.start_run()
    """
    if not workflow.is_main_process:
        return
    for path in PLAN.prune():
        logger.info(f"removed {path}: its folder is no longer in {PLAN.images}")
    if workflow.local_exec and folder_jobs_will_run():
        prestart(config, min(config["threads"], workflow.cores))
    show_image_progress()


onsuccess:
    say_failed_images()
    cancel_idle_timers()


def say_failed_images():
    """Name the folders with images that failed, after a run (never a silent 100 %)."""
    failed = failed_images(RESULTS)
    if failed:
        names = ", ".join(f"{key} ({n})" for key, n in list(failed.items())[:8])
        more = f" and {len(failed) - 8:,} more" if len(failed) > 8 else ""
        images = sum(failed.values())
        logger.warning(
            f"snakembed: {images:,} image{'s' * (images != 1)} failed in {len(failed):,} "
            f"folder{'s' * (len(failed) != 1)}: {names}{more}; see `snakembed info --results "
            f"{RESULTS}` for why"
        )


def cancel_idle_timers():
    """Let Snakemake exit as soon as the run is over. Its job rate limiter
    (--max-jobs-per-timespan, 100/1s by default) starts a one-second threading.Timer after
    every scheduling round to look again; Python waits for the last one at exit, which added
    0.5-1.5 s to every run. With every job done, nothing waits for what it would release.
    """
    for thread in threading.enumerate():
        if isinstance(thread, threading.Timer):
            thread.cancel()


def folder_jobs_will_run():
    return any(job.rule.name == FOLDER_RULE_NAME for job in workflow.dag.needrun_jobs())


def get_final_outputs():
    """The index, and every shard's record: a target, so that a record the plan set aside
    runs its shard (Snakemake does not remake a missing input of an up-to-date output).
    """
    return [
        f"{RESULTS}/index.h5",
        *get_shard_records(),
        *get_reduced_file(),
        *get_report_pages(),
    ]


def get_report_pages():
    if not config["report"]["enabled"]:
        return []
    names = ("summary.html", "labels.png", "map.html", "neighbours.html")
    return [f"{RESULTS}/report/{name}" for name in names]


def get_head_metrics():
    """The trained head's scores, for the report (nothing without a trained head)."""
    if needs_labels(config["classify"]["head"]):
        return [f"{get_trained_head_dir()}/metrics.json"]
    return []


def get_reduced_file():
    return [f"{RESULTS}/reduced.h5"] if config["reduce"]["method"] != "none" else []


def get_shard_records():
    """Each shard's record, the output of its job (see snakembed/shards.py)."""
    return [str(PLAN.record_file(shard)) for shard in PLAN.shards]


def get_images_root(wildcards):
    return str(PLAN.images)


def get_shard_manifest(wildcards):
    """The shard's manifest: its folders and their images, which the job reads."""
    return str(PLAN.manifest_file(wildcards.shard))


def get_shard_digest(wildcards):
    """The manifest's checksum: an image added, removed or changed in one of its folders
    reruns the shard (which computes only that folder).

    A parameter, not an input: Snakemake checks every input of every ready job each time it
    starts one.
    """
    return PLAN.manifest_digest(wildcards.shard)


def get_weights_file(wildcards):
    """The local checkpoint, or the record of the weights_fetch job for named weights."""
    if PLAN.weights_file:
        return [PLAN.weights_file]
    model = config["model"]
    return (
        [get_fetched_weights()] if needs_fetch(model["weights"], model["name"]) else []
    )


def get_fetched_weights():
    return f"{RESULTS}/weights/fetched.json"


def get_model_settings(wildcards):
    return json.dumps(config["model"], sort_keys=True)


def get_numbers(wildcards):
    """Everything that changes the embeddings: a change reruns every folder."""
    return json.dumps(PLAN.numbers, sort_keys=True)


def get_head_file():
    """A trained head's file (the train_head rule's), or nothing: other heads are built from
    the config by each folder's job (pretrained: the network's own classifier)."""
    if needs_labels(config["classify"]["head"]):
        return [f"{get_trained_head_dir()}/head.npz"]
    return []


def get_trained_head_dir():
    return f"{RESULTS}/heads/{config['classify']['head']}"


def get_head_settings(wildcards):
    """What a trained head depends on: a change trains it again and reclassifies every folder."""
    keys = ("head", "k", "weight_decay")
    settings = {
        "classify": {k: config["classify"][k] for k in keys},
        "model": config["model"],
    }
    return json.dumps(settings, sort_keys=True)


def get_classify_settings(wildcards):
    """What classification depends on: a change reclassifies every folder (reusing its
    embeddings)."""
    return json.dumps(config["classify"], sort_keys=True)


def get_labelled_images(wildcards):
    """The labelled images, and the labels CSV when the labels come from one."""
    labels = config["classify"]["labels"]
    csv = [labels] if labels and os.path.isfile(labels) else []
    return [*csv, *PLAN.labelled_inputs()]


def get_labelled_identity(wildcards):
    """The labelled images and labels by content: a change retrains the head."""
    return PLAN.labelled_identity()


def get_labelled_embeddings():
    return f"{RESULTS}/labelled/embeddings.npz"


def get_finetune_weights(wildcards):
    weights = config["finetune"]["weights"]
    return [weights] if is_local_weights(weights) else []


def get_finetune_settings(wildcards):
    """What fine-tuning depends on: a change trains again."""
    keys = ("name", "module", "kwargs")
    settings = {
        "model": {k: config["model"][k] for k in keys},
        "finetune": config["finetune"],
        "preprocess": config["preprocess"],
        "labels": config["classify"]["labels"],
        "val_fraction": config["classify"]["val_fraction"],
    }
    return json.dumps(settings, sort_keys=True)


def get_shard_mem_mb(wildcards, attempt):
    """2 GB, plus 50 kB per image of its largest folder (one folder is in memory at a time;
    the measured growth is 20 kB), more on each retry."""
    images = max(PLAN.folder_sizes(wildcards.shard), default=0)
    return (2000 + images // 20) * attempt


def get_shard_runtime(wildcards, attempt):
    """Minutes: 10, plus one per 600 images (10 images/s, slower than a CPU job), more on each
    retry."""
    images = PLAN.image_count(wildcards.shard)
    return (10 + images // 600) * attempt


def get_gpus(wildcards):
    """One GPU for a job on a GPU (device is resolved: `auto` has become cuda or cpu)."""
    return 1 if config["device"].startswith("cuda") else 0


def show_image_progress():
    """Progress lines in images, with their rate and the time left, as shard jobs finish (see
    snakemake_logger_plugin_snakembed): its handler joins Snakemake's logger unless --logger
    snakembed added it, and a record says how many images each shard job to run holds.
    """
    from snakemake_logger_plugin_snakembed import attach, images_extra, images_message

    shards = [
        job.wildcards.shard
        for job in workflow.dag.needrun_jobs()
        if job.rule.name.endswith(FOLDER_RULE)
    ]
    images = {shard: PLAN.pending_images(shard) for shard in shards}
    if images:
        attach(workflow.logger_manager)
        folders = sum(len(PLAN.changes.pending.get(shard, [])) for shard in shards)
        logger.info(images_message(images, folders), extra=images_extra(images))
