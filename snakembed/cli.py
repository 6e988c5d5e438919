"""The ``snakembed`` command: labels and vectors for single images, and a look at results.

It runs the same functions as the workflow's rules, so ``snakembed embed`` on an image gives
the vector the workflow stored for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snakembed", description="CNN embeddings and class predictions for images."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def images_command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
        p.add_argument("--configfile", help="the workflow's config.yaml (model, preprocessing)")
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        p.add_argument("--device", help="override the config's device (cpu, cuda, ...)")
        return p

    predict = images_command("predict", "Print the most likely labels of images.")
    predict.add_argument("--topk", type=int, help="how many labels per image (default: config)")
    predict.add_argument(
        "--head",
        metavar="FILE",
        help="a head file the workflow saved (results/heads/linear/head.npz); default: the "
        "model's own classifier",
    )
    images_command("embed", "Print the embedding vectors of images.")
    query = images_command(
        "query",
        "Print the stored images most similar to images (stored ones, or new ones embedded "
        "with the config's model), by cosine similarity.",
    )
    query.add_argument("--results", required=True, metavar="R", help="the results folder")
    query.add_argument("--top", type=int, default=10, metavar="K", help="hits per image (10)")
    query.add_argument(
        "--folder", metavar="F", help="search only folder F and the folders below it"
    )
    info = sub.add_parser("info", help="Summarise a results folder.")
    info.add_argument("results", metavar="RESULTS", help="the workflow's results folder")
    export = sub.add_parser(
        "export",
        help="Write every stored image (path, folder, id, label, score, embedding) to one table.",
    )
    export.add_argument("results", metavar="RESULTS", help="the workflow's results folder")
    export.add_argument(
        "--format", choices=["parquet", "npz", "csv"], default="parquet", help="default: parquet"
    )
    export.add_argument("--output", "-o", metavar="FILE", help="default: RESULTS/export.FORMAT")
    sub.add_parser("list", help="List the installed backbones and heads.")
    layers = sub.add_parser(
        "layers", help="List the layers of a backbone, as `model.layer` names them."
    )
    layers.add_argument("name", metavar="NAME", help="a backbone name (`snakembed list`)")
    return parser


def _config(args: argparse.Namespace) -> dict:
    from .config import load_config

    overrides: dict = {}
    if getattr(args, "device", None):
        overrides["device"] = args.device
    if getattr(args, "topk", None):
        overrides["classify"] = {"topk": args.topk}
    return load_config(args.configfile, overrides)


def _embed(args: argparse.Namespace, config: dict):
    from .embed import embed_images, load_backbone

    backbone = load_backbone(config)
    result = embed_images(args.images, config, ids=args.images, backbone=backbone)
    return backbone, result


def _report_failures(failed: dict[str, str], as_json: bool) -> int:
    """Failures are logged to stderr as they happen; with --json they are also lines."""
    if as_json:
        for image, reason in failed.items():
            print(json.dumps({"image": image, "error": reason}))
    return 1 if failed else 0


def _predict(args: argparse.Namespace) -> int:
    from .classify import predict
    from .heads import create_head, load_head, needs_labels

    config = _config(args)
    name = config["classify"]["head"]
    if name == "none":
        name = "pretrained"
    if args.head:
        name = str(args.head)
    elif needs_labels(name):
        raise ValueError(
            f"head {name!r} is trained by the workflow; pass its file, for example "
            f"--head {config['results']}/heads/{name}/head.npz"
        )
    backbone, result = _embed(args, config)
    head = load_head(args.head) if args.head else create_head(name, config, backbone)
    predictions = predict(head, name, result.ids, result.vectors, config["classify"]["topk"])
    for i, image in enumerate(predictions.ids):
        topk = [
            [str(lab), round(float(s), 6)]
            for lab, s in zip(predictions.labels[i], predictions.scores[i], strict=True)
        ]
        if args.json:
            print(
                json.dumps({"image": image, "label": topk[0][0], "score": topk[0][1], "topk": topk})
            )
        else:
            print(f"{image}\t{topk[0][0]}\t{topk[0][1]:.4f}")
    return _report_failures(result.failed, args.json)


def _embed_command(args: argparse.Namespace) -> int:
    _, result = _embed(args, _config(args))
    for image, vector in zip(result.ids, result.vectors, strict=True):
        if args.json:
            print(json.dumps({"image": image, "embedding": vector.tolist()}))
        else:
            print(image + "\t" + " ".join(repr(float(v)) for v in vector.reshape(-1)))
    return _report_failures(result.failed, args.json)


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
    vectors, failed = _query_vectors(args, store)
    found = search(store, list(vectors.values()), top=args.top, folders=folders) if vectors else []
    for image, hits in zip(vectors, found, strict=True):
        if args.json:
            rows = [
                {"path": h.path, "folder": h.folder, "image_id": h.image_id, "score": h.score}
                for h in hits
            ]
            print(json.dumps({"image": image, "hits": rows}))
        else:
            print(image)
            print("\n".join(f"  {h.score:.4f}\t{h.path}" for h in hits))
    return _report_failures(failed, args.json)


def _query_vectors(args: argparse.Namespace, store) -> tuple[dict, dict[str, str]]:
    """``{image: vector}`` in the order given: a stored image's stored vector, the others
    embedded with the config's model (which must be the store's); ``{image: reason}`` for
    images that could not be read."""
    from pathlib import Path

    stored = {}
    for image in args.images:
        with contextlib.suppress(KeyError):
            stored[image] = store.lookup(Path(image).resolve()).embedding
    new = [image for image in args.images if image not in stored]
    embedded, failed = {}, {}
    if new:
        _, result = _embed(argparse.Namespace(**{**vars(args), "images": new}), _config(args))
        _check_same_model(store, result.meta)
        embedded, failed = dict(zip(result.ids, result.vectors, strict=True)), result.failed
    vectors = {**stored, **embedded}
    return {image: vectors[image] for image in args.images if image in vectors}, failed


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
            "config with --configfile"
        )


def _info(args: argparse.Namespace) -> int:
    from .reader import open_store

    store = open_store(args.results)
    total = failed = 0
    lines = []
    attrs: dict = {}
    for key in store:
        folder = store[key]
        attrs = folder.attrs
        total += attrs["num_images"]
        failed += attrs["num_failed"]
        lines.append(f"  {key}: {attrs['num_images']} images, {attrs['num_failed']} failed")
    print(f"results: {store.results}")
    if store.images_root is not None:
        print(f"images: {store.images_root}")
    print(f"folders: {len(store)}, images: {total}, failed: {failed}")
    if attrs:
        print(
            f"model: {attrs['model']} ({attrs['weights']}), layer {attrs['layer']} "
            f"(pool {attrs.get('pool', 'avg')}), {attrs['embedding_dim']}-d; "
            f"classify: {attrs['classify']}"
        )
    print("\n".join(lines))
    for key in store:
        for image_id, reason in store[key].failed.items():
            print(f"failed: {key}/{image_id}: {reason}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

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
        0 on success, 1 when an image could not be read, 2 for a usage or config error.

    Example:
        >>> main(["predict", "demo/images/animals/chelsea.jpg"])  # doctest: +SKIP
        demo/images/animals/chelsea.jpg	tabby, tabby cat	0.4790
        0
    """
    from .backbones import WeightsError
    from .config import ConfigError

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="snakembed: %(message)s")
    commands = {
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
    except (ConfigError, WeightsError, LookupError, FileNotFoundError, ValueError) as exc:
        print(f"snakembed: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
