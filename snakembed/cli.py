"""The ``snakembed`` command: labels and vectors for single images, and a look at results.

It runs the same functions as the workflow's rules, so ``snakembed embed`` on an image gives
the vector the workflow stored for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

#: Folders that ``snakembed info`` lists one by one without ``--folders``.
_LISTED = 30


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error",
    )
    parser = argparse.ArgumentParser(
        prog="snakembed",
        description="CNN embeddings and class predictions for folders of images.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"snakembed {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common], allow_abbrev=False)
        p.set_defaults(command_parser=p)  # its own usage for what it does not take
        return p

    def results_option(
        p: argparse.ArgumentParser,
        help: str = "the results folder",
        default: str | None = "results",
        says: str = "results",
    ) -> None:
        p.add_argument(
            "--results", "-r", default=default, metavar="R", help=f"{help} (default: {says})"
        )

    run = command(
        "run",
        "Run the workflow on an image tree: embed and classify every folder that changed.",
    )
    run.usage = "snakembed run IMAGES [options] [-- SNAKEMAKE_ARGS ...]"
    run.epilog = (
        "Arguments after -- go to Snakemake as they are, for example: snakembed run photos "
        "-- --forceall --rerun-triggers mtime params. Exit status: Snakemake's."
    )
    run.add_argument("images", nargs="?", metavar="IMAGES", help="the root of the image tree")
    results_option(
        run,
        "where the results go; Snakemake keeps its records there too",
        default=None,
        says="the last --configfile's results, else results",
    )
    run.add_argument("--cores", "-c", metavar="N", help="CPU cores to use: N or all (default: all)")
    run.add_argument(
        "--profile",
        metavar="P",
        help="local or slurm (the profiles that come with snakembed), or a profile's folder",
    )
    run.add_argument(
        "--configfile",
        action="append",
        default=[],
        metavar="FILE",
        help="a config file, again for more (`snakembed config` prints every key); IMAGES "
        "replaces its images, and --results its results",
    )
    run.add_argument(
        "--config",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config keys, as snakemake --config takes them (threads=4 'classify={head: none}')",
    )
    run.add_argument(
        "--dry-run", "-n", action="store_true", help="show what would be computed, and why"
    )
    command("config", "Print the default configuration, every key with its description.")

    def images_command(name: str, help: str, results: bool = True) -> argparse.ArgumentParser:
        p = command(name, help)
        p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
        p.add_argument("--configfile", help="the workflow's config.yaml (model, preprocessing)")
        if results:
            head = ", and head, a trained one included" if name == "predict" else ""
            results_option(
                p,
                "a results folder: compute as its run did (its model, weights, layer, "
                f"preprocessing and precision{head})",
                default=None,
                says="the --configfile's model, else the default",
            )
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        p.add_argument("--device", help="override the config's device (cpu, cuda, ...)")
        return p

    predict = images_command("predict", "Print the most likely labels of images.")
    predict.add_argument(
        "--topk", type=_positive, help="how many labels per image, in --json (default: config)"
    )
    predict.add_argument(
        "--head",
        metavar="FILE",
        help="a head file the workflow saved (results/heads/linear/head.npz); default: the "
        "model's own classifier",
    )
    images_command("embed", "Print the embedding vectors of images.")
    query = images_command(
        results=False,
        name="query",
        help="Print the stored images most similar to images (stored ones, or new ones embedded "
        "as the results' run embedded them), by cosine similarity.",
    )
    results_option(query)
    query.add_argument("--top", type=_positive, default=10, metavar="K", help="hits per image (10)")
    query.add_argument(
        "--folder", metavar="F", help="search only folder F and the folders below it"
    )
    info = command("info", "Summarise a results folder.")
    results_option(info)
    info.add_argument(
        "--folders",
        action="store_true",
        help=f"list every folder (default: each one up to {_LISTED} folders, else the pending)",
    )
    export = command(
        "export",
        "Write every stored image (path, folder, id, label, score, embedding) to one table.",
    )
    results_option(export)
    export.add_argument(
        "--format", choices=["parquet", "npz", "csv"], default="parquet", help="default: parquet"
    )
    export.add_argument("--output", "-o", metavar="FILE", help="default: R/export.FORMAT")
    command("list", "List the installed backbones and heads.")
    layers = command("layers", "List the layers of a backbone, as `model.layer` names them.")
    layers.add_argument("name", metavar="NAME", help="a backbone name (`snakembed list`)")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _run(args: argparse.Namespace) -> int:
    from .run import run

    if args.images is None:
        taken = [entry for entry in args.config if "=" not in entry]
        hint = f" (--config took {taken[-1]!r}: give IMAGES before --config)" if taken else ""
        raise ValueError(f"snakembed run needs IMAGES, the root of your images{hint}")
    return run(
        args.images,
        args.results,
        cores=args.cores,
        profile_name=args.profile,
        configfiles=args.configfile,
        config=args.config,
        dry_run=args.dry_run,
        snakemake_args=args.snakemake_args,
    )


def _print_config(args: argparse.Namespace) -> int:
    from .config import describe_defaults

    print(describe_defaults(), end="")
    return 0


def _positive(text: str) -> int:
    """An argument that is a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


#: ``predict`` and ``embed`` trace the network (1-4 s, repaid by 1.4-2.4x faster batches on
#: the CPU) only for more images than this.
_TRACE_FROM = 256

#: Exit status for what was asked wrong (a config key, a missing file, a name that does not
#: exist), and for images that could not be read.
_ASKED, _UNREADABLE = 2, 1


def _settings(args: argparse.Namespace) -> dict | None:
    """The recorded settings of ``--results`` (predict, embed; query without --configfile)."""
    from .reader import open_store

    if args.command == "query":
        if args.configfile:
            return None
        with contextlib.suppress(ValueError):
            return open_store(args.results).settings()
        return None
    return open_store(args.results).settings() if args.results else None


def _config(args: argparse.Namespace, settings: dict | None = None) -> dict:
    """The config to compute with: the run's recorded settings, over the --configfile, under
    the command line's options."""
    from .config import load_config, merge_config

    overrides: dict = {}
    if settings:
        overrides = {key: value for key, value in settings.items() if key != "classify"}
        if settings.get("classify"):
            overrides["classify"] = {"head": settings["classify"]}
    if getattr(args, "device", None):
        overrides["device"] = args.device
    if getattr(args, "topk", None) is not None:
        merge_config(overrides, {"classify": {"topk": args.topk}})
    return load_config(args.configfile, overrides)


def _embed(
    args: argparse.Namespace, config: dict, recorded: bool = False, head: Path | None = None
):
    """The embeddings and predictions (none with ``classify.head: none``) of the images that
    exist, computed as a run computes them (:func:`~snakembed.pipeline.compute_images`: by a
    worker that outlives the command for the next one, when workers are on), and a reason for
    each missing one. ``recorded``: the config is a run's (no advice to change it)."""
    from .config import resolved
    from .devices import compute_from_config, precision_warning
    from .pipeline import compute_images

    warning = precision_warning(compute_from_config(resolved(config)))
    if warning and not recorded:
        logging.getLogger("snakembed").warning(warning)

    images = [image for image in args.images if Path(image).is_file()]
    missing = {image: _missing(image) for image in args.images if image not in images}
    if not images:
        return None, None, missing
    # a handful of images: the network as it is, without the trace's seconds
    config = {**config, "optimize": config["optimize"] and len(images) > _TRACE_FROM}
    library = logging.getLogger("snakembed")
    level = library.level
    library.setLevel(logging.ERROR)  # its lines name failed images by absolute path: see _answer
    try:
        result, predictions = compute_images(images, config, head=head)
    finally:
        library.setLevel(level)
    return result, predictions, missing


def _with_head(config: dict, head: str) -> dict:
    """``config`` with ``classify.head`` set (``none``: vectors only)."""
    return {**config, "classify": {**config["classify"], "head": head}}


def _missing(image: str) -> str:
    from .buckets import is_bucket, is_misspelt_bucket

    path = Path(image)
    if is_bucket(image) or is_misspelt_bucket(image):
        return (
            "images in a bucket are read by runs only: snakembed run s3://BUCKET/PREFIX, or copy "
            "the image here first (aws s3 cp)"
        )
    if path.is_dir():
        return "is a folder; give image files (snakembed run embeds a folder tree)"
    return "no such file; check the path"


def _answer(
    args: argparse.Namespace,
    answers: dict[str, tuple[dict, str]],
    failed: dict[str, str],
    missing: dict[str, str],
) -> int:
    """Print each image's answer (``{image: (its JSON fields, its plain text)}``), or why it
    has none (a line on stderr, and with --json a line on stdout), in the order given, once per
    time it was given. Exit status: 2 for a missing file, 1 for an unreadable one, else 0."""
    for image in args.images:
        if image in answers:
            fields, text = answers[image]
            print(json.dumps({"image": image, **fields}) if args.json else text)
            continue
        reason = missing.get(image) or failed.get(image) or "not computed"
        print(f"snakembed: {image}: {reason}", file=sys.stderr)
        if args.json:
            print(json.dumps({"image": image, "error": reason}))
    return _ASKED if missing else _UNREADABLE if failed else 0


def _check_results(args: argparse.Namespace, meta: dict) -> None:
    """With --results: the new vectors must be comparable with the stored ones (the run's
    checkpoint, or its network's code, unchanged since)."""
    if not args.results:
        return
    from .reader import open_store

    store = open_store(args.results)
    settings = store.settings()
    with store[store.folders()[0]] as folder:
        stored = folder.attrs
    for key, what in (("weights_sha256", "checkpoint"), ("module_sha256", "network's code")):
        if stored.get(key, "") != meta[key]:
            source = settings["model"]["weights" if key == "weights_sha256" else "module"]
            raise ValueError(
                f"the {what} {source} changed since the run that wrote {store.results} (sha256 "
                f"then {stored.get(key) or 'none'}, now {meta[key] or 'none'}): its vectors "
                "would not be comparable with the stored ones; run the workflow again, or "
                "restore the file"
            )
    _check_same_model(store, meta)


def _predict(args: argparse.Namespace) -> int:
    from .heads import needs_labels

    config = _config(args, _settings(args))
    name = config["classify"]["head"]
    if name == "none":
        name = "pretrained"
    head_file = args.head
    if head_file is None and needs_labels(name):
        results = args.results or config["results"]
        head_file = Path(results) / "heads" / name / "head.npz"
        if not head_file.is_file():
            raise FileNotFoundError(
                f"head {name!r} is trained by the workflow, and {head_file} does not exist; "
                f"pass its file with --head, or the run's results with --results"
            )
    config = _with_head(config, name)
    result, predictions, missing = _embed(args, config, bool(args.results), head_file)
    if result is None:
        return _answer(args, {}, {}, missing)
    _check_results(args, result.meta)
    answers = {}
    for i, image in enumerate(predictions.ids):
        topk = [
            [str(lab), round(float(s), 6)]
            for lab, s in zip(predictions.labels[i], predictions.scores[i], strict=True)
        ]
        answers[image] = (
            {"label": topk[0][0], "score": topk[0][1], "topk": topk},
            f"{image}\t{topk[0][0]}\t{topk[0][1]:.4f}",
        )
    return _answer(args, answers, result.failed, missing)


def _embed_command(args: argparse.Namespace) -> int:
    config = _with_head(_config(args, _settings(args)), "none")
    result, _, missing = _embed(args, config, bool(args.results))
    if result is None:
        return _answer(args, {}, {}, missing)
    _check_results(args, result.meta)
    answers = {
        image: (
            {"embedding": vector.tolist()},
            image + "\t" + " ".join(repr(float(v)) for v in vector.reshape(-1)),
        )
        for image, vector in zip(result.ids, result.vectors, strict=True)
    }
    return _answer(args, answers, result.failed, missing)


def _query(args: argparse.Namespace) -> int:
    from .reader import open_store
    from .search import search

    store = open_store(args.results)
    folders = None
    if args.folder:
        folder = args.folder.strip("/") or "."
        folders = [k for k in store if folder == "." or k == folder or k.startswith(folder + "/")]
        if not folders:
            raise ValueError(f"no folder {args.folder!r} in {store.results}; see `snakembed info`")
    vectors, failed, missing = _query_vectors(args, store)
    found = search(store, list(vectors.values()), top=args.top, folders=folders) if vectors else []
    answers = {
        image: (
            {
                "hits": [
                    {"path": h.path, "folder": h.folder, "image_id": h.image_id, "score": h.score}
                    for h in hits
                ]
            },
            "\n".join([image, *(f"  {h.score:.4f}\t{h.path}" for h in hits)]),
        )
        for image, hits in zip(vectors, found, strict=True)
    }
    return _answer(args, answers, failed, missing)


def _query_vectors(args: argparse.Namespace, store) -> tuple[dict, dict, dict]:
    """``{image: vector}`` in the order given: a stored image's stored vector, the others
    embedded as the store's run embedded them (or with --configfile's model, which must be the
    store's); ``{image: reason}`` for images that could not be read, and for missing ones."""
    stored = {}
    for image in args.images:
        with contextlib.suppress(KeyError):
            stored[image] = store.lookup(Path(image).resolve()).embedding
    new = [image for image in args.images if image not in stored]
    embedded, failed, missing = {}, {}, {}
    if new:
        settings = _settings(args)
        config = _with_head(_config(args, settings), "none")
        new_args = argparse.Namespace(**{**vars(args), "images": new})
        result, _, missing = _embed(new_args, config, recorded=settings is not None)
        if result is not None:
            _check_same_model(store, result.meta)
            embedded, failed = dict(zip(result.ids, result.vectors, strict=True)), result.failed
    vectors = {**stored, **embedded}
    return {image: vectors[image] for image in args.images if image in vectors}, failed, missing


def _check_same_model(store, meta: dict) -> None:
    """Embeddings of another model or preprocessing cannot be compared with the store's."""
    keys = ("model", "weights_sha256", "layer", "pool", "preprocess")
    stored = {}
    if store.folders():
        with store[store.folders()[0]] as folder:
            stored = folder.attrs
    differ = [
        key
        for key in keys
        if key in stored
        and json.dumps(stored[key], sort_keys=True)
        != json.dumps(json.loads(json.dumps(meta[key])), sort_keys=True)
    ]
    if differ:
        raise ValueError(
            f"{store.results} was embedded with another {', '.join(differ)} than this config "
            f"gives ({', '.join(f'{k}: {stored[k]!r}' for k in differ)}); pass the workflow's "
            "config with --configfile, or, if its checkpoint or network changed since, run the "
            "workflow again"
        )


def _info(args: argparse.Namespace) -> int:
    from collections import Counter

    from .reader import open_store

    store = open_store(args.results)
    status = store.status
    folders: dict[str, dict | None] = dict.fromkeys(status.folders)  # None: pending
    failures = []
    for key in status.done:
        with store[key] as folder:
            folders[key] = folder.attrs
            failures += [f"failed: {key}/{i}: {reason}" for i, reason in folder.failed.items()]
    done = {key: attrs for key, attrs in folders.items() if attrs is not None}
    models = {key: _describe_model(attrs) for key, attrs in done.items()}
    heads = {key: attrs.get("classify") for key, attrs in done.items()}
    print(f"results: {store.results}")
    if store.images_root is not None:
        print(f"images: {store.images_root}")
    total = sum(attrs["num_images"] for attrs in done.values())
    failed = sum(attrs["num_failed"] for attrs in done.values())
    waiting = f", pending: {len(status.pending)}" if status.pending else ""
    print(f"folders: {len(folders)}, images: {total}, failed: {failed}{waiting}")
    model_counts, head_counts = Counter(models.values()), Counter(heads.values())
    mixed = len(model_counts) > 1  # after a run that was stopped part-way
    for model, count in model_counts.items():
        print(f"model: {model}{_share(count, len(done), mixed)}")
    for head, count in head_counts.items():
        share = _share(count, len(done), len(head_counts) > 1)
        print(f"classify: {_describe_head(head, store.results)}{share}")
    if status.index_behind:
        print(
            "index.h5 is behind the folder files (a run stopped before it updated it): "
            "run the workflow to update it; open_store reads the folder files meanwhile"
        )
    every = args.folders or len(folders) <= _LISTED
    pending = 0
    for key, attrs in folders.items():
        if attrs is None:
            pending += 1
            if every or pending <= _LISTED:
                why = status.pending[key] + _shard_log(store.results, status.shards.get(key))
                print(f"  {key}: pending ({why}); run the workflow to compute it")
            continue
        if every:
            which = f" ({models[key]})" if mixed else ""
            count = _count(attrs["num_images"], "image")
            print(f"  {key}: {count}, {attrs['num_failed']} failed{which}")
    if not every:
        more = f", {pending - _LISTED:,} more pending" if pending > _LISTED else ""
        print(f"  ({len(done):,} folders done{more}: --folders lists each)")
    if failures:
        print("\n".join(failures))
    return 0


def _shard_log(results: Path, shard: str | None) -> str:
    """``"; log: {its shard's log}"`` where the folder's shard job has a log, else ``""``."""
    from .plan import FOLDER_RULE

    log = results / "logs" / FOLDER_RULE / f"{shard}.log"
    return f"; log: {log}" if shard is not None and log.is_file() else ""


def _describe_model(attrs: dict) -> str:
    return (
        f"{attrs['model']} ({attrs['weights']}), layer {attrs['layer']} "
        f"(pool {attrs.get('pool', 'avg')}), {attrs['embedding_dim']}-d, "
        f"{attrs.get('precision', '?')} on {attrs.get('device', '?')}"
        f"{', compiled' if attrs.get('compiled') else ''}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _share(count: int, computed: int, mixed: bool) -> str:
    """`` (2 of 5 folders)`` where the folders do not all agree, else nothing."""
    return f" ({count} of {computed} folders)" if mixed else ""


def _describe_head(head: str | None, results) -> str:
    """What classified the images: none, the model's own classifier, or a trained head with
    its validation score (from the train_head rule's metrics file)."""
    if head in (None, "none"):
        return "none (classify.head: none; embeddings only)"
    if head == "pretrained":
        return "pretrained (the model's own classifier)"
    metrics_file = results / "heads" / head / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, ValueError):
        return head
    settings = ", ".join(f"{k}={v}" for k, v in metrics.get("settings", {}).items())
    return (
        f"{head} ({settings}; {len(metrics['categories'])} classes, val accuracy "
        f"{metrics['accuracy']:.3f} on {metrics['val_images']} images; {metrics_file})"
    )


def _export(args: argparse.Namespace) -> int:
    from .export import export

    output = args.output or Path(args.results) / f"export.{args.format}"
    rows = export(args.results, output, args.format)
    print(f"{output}: {rows} images", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    from .backbones import list_backbones
    from .heads import list_heads

    for kind, names in (("backbones", list_backbones()), ("heads", list_heads())):
        print(f"{kind} ({len(names)}):")
        print("\n".join(f"  {name}" for name in names))
    return 0


def _layers(args: argparse.Namespace) -> int:
    from .backbones import create_backbone
    from .backbones.layers import layer_names

    backbone = create_backbone(args.name, weights="none")
    print("pre_logits")
    print("\n".join(layer_names(backbone.model)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI.

    Returns:
        0 on success; 1 when an image could not be read, or for an unexpected error; 2 for an
        error in what was asked (a config key, a missing file, a name that does not exist);
        ``snakembed run``: Snakemake's status. Errors are one line; ``--debug`` shows the
        traceback.

    Example:
        >>> main(["predict", "demo/images/animals/chelsea.jpg"])  # doctest: +SKIP
        demo/images/animals/chelsea.jpg	tabby, tabby cat	0.4790
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    snakemake_args: list[str] = []
    if "--" in argv:  # what follows goes to Snakemake as it is
        argv, snakemake_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        hint = ""
        if args.command in ("info", "export", "query") and not unknown[0].startswith("-"):
            hint = f"; give the results folder as --results {unknown[0]}"
        elif args.command == "run" and unknown[0].startswith("-"):
            hint = f"; Snakemake's own options go after --: snakembed run IMAGES -- {unknown[0]}"
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if snakemake_args and args.command != "run":
        parser.error(f"only `snakembed run` takes arguments after --, not {args.command}")
    args.snakemake_args = snakemake_args
    logging.basicConfig(level=logging.WARNING, format="snakembed: %(message)s")
    commands = {
        "run": _run,
        "config": _print_config,
        "predict": _predict,
        "embed": _embed_command,
        "query": _query,
        "info": _info,
        "export": _export,
        "list": _list,
        "layers": _layers,
    }
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("snakembed: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - every error is one line, unless --debug
        if getattr(args, "debug", False):
            raise
        # Config errors, missing files, unknown names and unreadable results say what to fix.
        asked = isinstance(exc, LookupError | OSError | ValueError)
        hint = "" if asked else " (snakembed --debug shows where)"
        print(f"snakembed: error: {_one_line(exc)}{hint}", file=sys.stderr)
        return 2 if asked else 1


def _one_line(exc: BaseException) -> str:
    """The message on one line (a config error naming several keys: one after another)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    text = "".join(
        (" " if i and lines[i - 1].endswith(":") else "; " if i else "") + line
        for i, line in enumerate(lines)
    )
    if isinstance(exc, LookupError | OSError | ValueError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
