"""The pages of ``snakemake --report``: a run summary, labels per folder, a map of the
embeddings and the nearest neighbours of sample images.

Each page is one self-contained file (styles inline, thumbnails as data URIs), so Snakemake's
report embeds it as it is and a browser shows it without the image tree. Thumbnails are made
from the original images when the pages are written; an image that cannot be read any more is
shown as its name.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import html
import io
import json
import logging
import os
import threading
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._files import atomic_path
from .buckets import READ_CONCURRENCY, BucketUnavailable, is_bucket, object_identity, root_path
from .images import ImageError, decode_image, read_image_bytes
from .layout import ROOT_FOLDER, folder_file
from .reader import Store, open_store
from .reduce import fit_pca_sample
from .search import Hit, best_rows, name_hits, unit_queries

__all__ = ["write_report_pages"]

log = logging.getLogger("snakembed")

#: Labels (or folders) that get their own colour on the map and bars in the label plot.
_TOP = 10
_COLOURS = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
]  # fmt: skip
_OTHER = "#d3d3d3"
_STYLE = """<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em; color: #222 }
table { border-collapse: collapse; margin: .5em 0 1.5em } td, th { padding: 2px 10px;
border-bottom: 1px solid #ddd; text-align: left } td.n { text-align: right }
.strip { display: flex; gap: 8px; margin: 0 0 1.2em; align-items: flex-start }
.strip figure { margin: 0; width: 112px; font-size: 11px; overflow-wrap: anywhere }
.strip figure.query { border-right: 2px solid #888; padding-right: 8px }
.strip img { width: 112px; height: 112px; object-fit: cover; display: block }
svg .pt image { display: none } svg .pt:hover image { display: inline }
svg .pt:hover circle { stroke: #000; stroke-width: 2 }
.legend span { display: inline-block; margin-right: 1em }
.legend i { display: inline-block; width: .8em; height: .8em; margin-right: .3em }
</style>"""


@dataclass
class _Sample:
    """Images drawn from the whole store (see :func:`_draw`), in folder order, with their
    vectors; ``origins`` names each image's row of a version of a folder file."""

    folders: list[str]
    ids: list[str]
    paths: list[Path | None]
    digests: list[str]
    labels: list[str | None]
    draws: list[float]
    origins: list[str]
    vectors: np.ndarray


def write_report_pages(
    results: str | Path,
    summary: str | Path,
    labels: str | Path,
    embedding_map: str | Path,
    neighbours: str | Path,
    *,
    points: int = 1000,
    queries: int = 5,
    metrics: str | Path | None = None,
) -> None:
    """Write the report's pages from a results folder.

    Args:
        results: the workflow's results folder (read through its index).
        summary: the run summary (HTML): folders, images, failures with their reasons, the time
            of each stage (from ``results/benchmarks``) and, with ``metrics``, the trained
            head's scores.
        labels: the label distribution of each folder (PNG).
        embedding_map: a 2-D map of the embeddings (HTML, SVG inside): UMAP where the ``umap``
            package is installed, else PCA; a thumbnail shows on hover.
        neighbours: the nearest stored images of a few sample images, as thumbnail strips.
        points: images drawn for the map, at random across the store (the same draw from
            report to report).
        queries: sample images for the neighbour strips.
        metrics: the trained head's ``metrics.json``, or None.

    Example:
        >>> write_report_pages("results", "s.html", "l.png", "m.html", "n.html")  # doctest: +SKIP
    """
    from .embed import log_to_stderr

    log_to_stderr()
    store = open_store(results)
    kept = Path(embedding_map).parent
    folders = _read_folders(store, kept / _FOLDERS, points)
    _write_text(summary, _summary_page(folders, Path(results), metrics))
    _plot_labels(folders, labels)
    sample = _sample(store, folders, points, kept / _VECTORS)
    thumbnails = _Thumbnails(kept / _THUMBNAILS)
    _write_text(embedding_map, _map_page(store, sample, thumbnails))
    found = _neighbours(store, folders, sample, queries, kept / _NEIGHBOURS)
    _write_text(neighbours, _neighbours_page(sample, found, thumbnails))
    made = thumbnails.save()
    log.info(
        "report pages written: %d images on the map; %d thumbnails made, %d kept from the last run",
        len(sample.ids),
        made,
        thumbnails.used - made,
    )


def _write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"{_STYLE}</head><body><h2>{html.escape(title)}</h2>{body}</body></html>\n"
    )


def _table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        numeric = isinstance(value, int | float | np.integer | np.floating)
        return f'<td class="n">{value}</td>' if numeric else f"<td>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _read_folders(store: Store, path: Path, points: int) -> dict[str, dict]:
    """What the pages need of each folder (its provenance, failures, label counts and the
    images it may give the sample: see :func:`_draw`), read from the folder files that changed
    since the last report and kept beside the pages: a one-folder change reads one folder
    file."""
    kept = _load_json(path)
    folders, read = {}, set()
    for key in store:
        stamp = _file_key(folder_file(store.results, key))
        entry = kept.get(key)
        # an entry of another version of the file, or kept by an older snakembed: read it
        usable = stamp and isinstance(entry, dict) and entry.keys() >= _ENTRY
        if not usable or entry["stamp"] != stamp:
            folders[key] = None
            read.add(key)
            continue
        folders[key] = entry
    total = sum(entry["attrs"]["num_images"] for entry in folders.values() if entry) + sum(
        len(store.view(key)) for key in read
    )
    # each folder keeps the images it would give a sample of four times the size: a store
    # that grows or shrinks a little keeps every folder's share; beyond that, the folders short
    # of images are read again (below)
    cap = min(1.0, 4 * points / max(total, 1))
    for key in read:
        folders[key] = _folder_entry(store, key, cap)
    while True:  # twice at most: a short folder's cap at least doubles, or becomes 1 (all)
        need = _threshold(folders, points)
        # a folder whose candidates stop at or below the sample's highest draw may hold
        # images of the sample that it did not keep
        short = [key for key, entry in folders.items() if entry["cap"] <= need and entry["cap"] < 1]
        if not short:
            break
        for key in short:
            read.add(key)
            folders[key] = _folder_entry(store, key, min(1.0, max(cap, 2 * need)))
    with contextlib.suppress(OSError), atomic_path(path) as tmp:
        tmp.write_text(json.dumps(folders))
    kept_too = " (the others kept from the last report)" if len(read) < len(folders) else ""
    log.info("report: %d of %d folder files read%s", len(read), len(folders), kept_too)
    return folders


def _folder_entry(store: Store, key: str, cap: float) -> dict:
    """What the pages keep of folder ``key`` (see :func:`_read_folders`): the images of draw
    below ``cap`` are its candidates for the sample."""
    stamp = _file_key(folder_file(store.results, key))
    with store[key] as folder:
        attrs = folder.attrs
        table = folder.table(embeddings=False)
    rows = zip(table["image_id"], table["source"], table["sha256"], table["label"], strict=True)
    candidates = []
    for row, (image_id, source, digest, label) in enumerate(rows):
        draw = _draw(key, image_id)
        if draw < cap:
            candidates.append([draw, row, image_id, source, digest, label])
    return {
        "stamp": stamp,
        "attrs": {name: attrs.get(name) for name in _FACTS},
        "labels": Counter(_NOT_CLASSIFIED if label is None else label for label in table["label"]),
        "cap": cap,
        "candidates": sorted(candidates),
    }


def _draw(key: str, image_id: str) -> float:
    """A number in [0, 1) fixed by the image's folder and id, as if drawn at random: the
    sample is the images of the lowest draws, so a change to the store changes the sample only
    by the images it adds or removes there (and the map's other thumbnails and vectors are
    kept)."""
    digest = hashlib.blake2b(f"{key}\0{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _threshold(folders: dict[str, dict], points: int) -> float:
    """The highest draw of the sample of ``points`` images, from the folders' candidates; 1
    (all) when they hold fewer images than the sample wants."""
    draws = sorted(c[0] for entry in folders.values() for c in entry["candidates"])
    total = sum(entry["attrs"]["num_images"] for entry in folders.values())
    wanted = min(points, total)
    if not wanted:
        return -1.0  # no sample: no folder is short of candidates
    return draws[wanted - 1] if len(draws) >= wanted else 1.0


def _load_json(path: Path) -> dict:
    """A dict kept by the last report, or an empty one (none, unreadable, or another shape)."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def _file_key(path: Path) -> list[int] | None:
    """A file's size, modification time and inode (None when there is none)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns, info.st_ino]


def _summary_page(folders: dict[str, dict], results: Path, metrics: str | Path | None) -> str:
    images = failed = 0
    failures, model = [], {}
    for key, entry in folders.items():
        attrs = entry["attrs"]
        images += attrs["num_images"]
        failed += attrs["num_failed"]
        failures += [[key, image, why] for image, why in attrs["failed"].items()]
        model = model or attrs
    parts = [
        _table(["folders", "images embedded", "images failed"], [[len(folders), images, failed]])
    ]
    if model:
        parts.append(
            f"<p>Model <b>{html.escape(str(model['model']))}</b> "
            f"({html.escape(str(model['weights']))}), layer {html.escape(str(model['layer']))}, "
            f"{model['embedding_dim']}-d; head: {html.escape(json.dumps(model['classify']))}.</p>"
        )
    parts.append("<h3>Time per stage</h3>" + _stage_times(results / "benchmarks"))
    if metrics is not None:
        parts.append(
            "<h3>Trained head</h3>" + _metrics_table(json.loads(Path(metrics).read_text()))
        )
    shown = failures[:1000]
    parts.append(f"<h3>Failures ({len(failures)})</h3>")
    if failures:
        parts.append(_table(["folder", "image", "reason"], shown))
        if len(failures) > len(shown):
            parts.append(f"<p>… and {len(failures) - len(shown)} more: `snakembed info`.</p>")
    return _page("Run summary", "".join(parts))


def _stage_times(benchmarks: Path) -> str:
    """Seconds per rule, from Snakemake's benchmark files (one per job)."""
    rows = []
    for rule in sorted(p for p in benchmarks.iterdir()) if benchmarks.is_dir() else []:
        files = sorted(rule.rglob("*.tsv")) if rule.is_dir() else [rule]
        seconds = []
        for path in files:
            with open(path, newline="") as fh:
                seconds += [float(row["s"]) for row in csv.DictReader(fh, delimiter="\t")]
        if seconds:
            name = rule.name.removesuffix(".tsv")
            rows.append(
                [name, len(seconds), round(sum(seconds), 1), round(float(np.mean(seconds)), 2)]
            )
    if not rows:
        return "<p>No benchmark files yet.</p>"
    return _table(["stage (rule)", "jobs", "seconds in all", "seconds per job"], rows)


def _metrics_table(metrics: dict) -> str:
    rows = [["accuracy", round(metrics["accuracy"], 4)]]
    rows += [[f"macro {k}", round(v, 4)] for k, v in metrics["macro"].items() if k != "support"]
    per_class = [
        [name, round(m["precision"], 4), round(m["recall"], 4), round(m["f1"], 4), m["support"]]
        for name, m in metrics["per_class"].items()
    ]
    return _table(["metric", "value"], rows) + _table(
        ["class", "precision", "recall", "F1", "support"], per_class
    )


def _plot_labels(folders: dict[str, dict], path: str | Path) -> None:
    """Stacked bars: each folder's images by predicted label (the most frequent labels
    overall get a colour each, the rest are `other`)."""
    # a Figure of its own, drawn by Agg: no pyplot (its import alone costs a third of a second)
    from matplotlib.figure import Figure

    counts: dict[str, dict[str, int]] = {key: entry["labels"] for key, entry in folders.items()}
    largest = sorted(counts, key=lambda k: -sum(counts[k].values()))[:40]
    totals: dict[str, int] = {}
    for per in counts.values():
        for label, n in per.items():
            totals[label] = totals.get(label, 0) + n
    top = sorted(totals, key=lambda label: -totals[label])[:_TOP]
    fig = Figure(figsize=(9, 1.5 + 0.32 * max(len(largest), 1)))
    ax = fig.add_subplot()
    left = np.zeros(len(largest))
    for i, label in enumerate([*top, "other"]):
        widths = np.array(
            [
                counts[k].get(label, 0)
                if label != "other"
                else sum(n for lab, n in counts[k].items() if lab not in top)
                for k in largest
            ],
            float,
        )
        colour = _COLOURS[i] if label != "other" else _OTHER
        ax.barh(largest, widths, left=left, color=colour, label=label[:40])
        left += widths
    ax.invert_yaxis()
    ax.set_xlabel("images")
    shown = f" (the {len(largest)} largest of {len(counts)})" if len(counts) > len(largest) else ""
    ax.set_title(f"Predicted labels per folder{shown}", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _sample(store: Store, folders: dict[str, dict], points: int, path: Path) -> _Sample:
    """The ``points`` images of the lowest draws (see :func:`_draw`) in folder order, their
    vectors kept beside the pages by folder file version and row: after a change, only the
    folders that give the sample new images are read (``folders``: see
    :func:`_read_folders`)."""
    order = {key: i for i, key in enumerate(folders)}
    need = _threshold(folders, points)
    chosen = sorted(
        (order[key], candidate[1], key, candidate)
        for key, entry in folders.items()
        for candidate in entry["candidates"]
        if candidate[0] <= need
    )
    kept = _load_vectors(path)
    sample = _Sample([], [], [], [], [], [], [], np.zeros((0, 0), np.float32))
    vectors, views, read = [], {}, 0
    root = store.images_root
    for _, row, key, (draw, _, image_id, source, digest, label) in chosen:
        origin = json.dumps([key, folders[key]["stamp"], row])
        vector = kept.get(origin)
        if vector is None:
            if key not in views:
                views[key] = store.view(key)
            vector = np.asarray(views[key][row], np.float32)
            vector = vector.mean(axis=0) if vector.ndim == 2 else vector  # a map: its mean
            read += 1
        sample.folders.append(key)
        sample.ids.append(image_id)
        sample.paths.append(root / source if root else None)
        sample.digests.append(digest)
        sample.labels.append(label)
        sample.draws.append(draw)
        sample.origins.append(origin)
        vectors.append(vector)
    dim = len(vectors[0]) if vectors else 0
    sample.vectors = np.asarray(vectors, np.float32).reshape(-1, dim)
    with contextlib.suppress(OSError), atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, origins=np.asarray(sample.origins, str), vectors=sample.vectors)
    log.info(
        "report: %d of the sample's %d vectors read from %d folder files",
        read,
        len(vectors),
        len(views),
    )
    return sample


def _load_vectors(path: Path) -> dict[str, np.ndarray]:
    """The last report's sample vectors by origin (see :class:`_Sample`)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return dict(zip(data["origins"].tolist(), data["vectors"], strict=True))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # damaged: read again
        return {}


#: What the pages need of each folder, kept from the last report (see :func:`_read_folders`).
_FOLDERS = ".folders.json"

#: What the pages keep of each folder (see :func:`_folder_entry`).
_ENTRY = {"stamp", "attrs", "labels", "cap", "candidates"}

#: The attributes of a folder file that the pages show.
_FACTS = (
    "num_images", "num_failed", "failed", "model", "weights", "layer", "embedding_dim", "classify"
)  # fmt: skip

_NOT_CLASSIFIED = "(not classified)"

#: The sample's vectors of the last report (see :func:`_sample`).
_VECTORS = ".sample.npz"

#: The nearest neighbours of the last report (see :func:`_neighbours`).
_NEIGHBOURS = ".neighbours.json"

#: Stored images shown beside each sample image on the neighbours page.
_STRIP = 6

#: The thumbnails of the last report, beside its pages, so that the next one makes only new
#: ones: a one-image change must not decode the thousand images of the map again.
_THUMBNAILS = ".thumbnails.json"


class _Thumbnails:
    """The report's thumbnails (data URIs), kept between runs by the image's content (its
    sha256 in the store: no request or file status per image) or, for an image the caller
    knows only by its path, by the file (path, size, modification time; an object's size, ETag
    and time), and by side; :meth:`save` keeps only those this report used."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._kept = _load_json(path)
        self._used: dict[str, str | None] = {}
        self._stale: set[str] = set()
        self._made = 0
        self._unavailable = threading.Event()  # the bucket cannot be read: no more asking

    @property
    def used(self) -> int:
        return len(self._used)

    def __call__(
        self, paths: list[Path | None], side: int, digests: list[str | None] | None = None
    ) -> list[str | None]:
        """:func:`_thumbnail` of each path (``digests``: the sha256 of each image's content as
        stored, where known), the missing ones decoded in a thread per core (Pillow lets go of
        the GIL while it decodes), or many per core for a bucket (each image a request)."""
        digests = digests if digests is not None else [None] * len(paths)
        bucket = any(is_bucket(path) for path in paths)
        threads = READ_CONCURRENCY if bucket else os.cpu_count() or 1
        with ThreadPoolExecutor(threads) as pool:
            keys = list(pool.map(self._key, paths, [side] * len(paths), digests))
            missing = {
                key: (path, digest)
                for key, path, digest in zip(keys, paths, digests, strict=True)
                if key is not None and key not in self._used and key not in self._kept
            }
            made = pool.map(lambda job: self._make(job[0], side, job[1]), missing.values())
            for key, (uri, current) in zip(missing, made, strict=True):
                self._used[key] = uri
                if not current:  # the file changed since it was embedded: shown, not kept
                    self._stale.add(key)
        self._made += len(missing)
        for key in keys:
            if key is not None and key not in self._used:
                self._used[key] = self._kept[key]
        # a file that cannot be read: its warning says why
        return [
            self._used[key] if key is not None else self._make(path, side)[0]
            for key, path in zip(keys, paths, strict=True)
        ]

    def _key(self, path: Path | None, side: int, digest: str | None) -> str | None:
        if self._unavailable.is_set():
            return None
        try:
            return _thumbnail_key(path, side, digest)
        except BucketUnavailable as exc:
            self._gone(exc)
            return None

    def _make(self, path: Path | None, side: int, digest: str | None = None):
        """:func:`_thumbnail`; none (not kept) once the bucket cannot be read: the pages are
        written without those thumbnails, saying why, and the next report makes them."""
        if self._unavailable.is_set():
            return None, False
        try:
            return _thumbnail(path, side, digest)
        except BucketUnavailable as exc:
            self._gone(exc)
            return None, False

    def _gone(self, exc: BucketUnavailable) -> None:
        if not self._unavailable.is_set():
            self._unavailable.set()
            log.warning("report: the pages are written without the bucket's thumbnails: %s", exc)

    def save(self) -> int:
        """Keep the thumbnails used (a new file, at most a report's worth); returns how many
        were made."""
        kept = {key: uri for key, uri in self._used.items() if key not in self._stale}
        with contextlib.suppress(OSError), atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(kept))
        return self._made


def _thumbnail_key(path: Path | None, side: int, digest: str | None = None) -> str | None:
    if path is None:
        return None
    if digest:
        return f"{side}:sha256:{digest}"
    try:
        if is_bucket(path):  # its size, ETag and time: another object under the key is new
            return f"{side}:{':'.join(map(str, object_identity(str(path))))}:{path}"
        info = os.stat(path)
    except OSError:
        return None  # unreadable: _thumbnail says why when it is asked
    return f"{side}:{info.st_size}:{info.st_mtime_ns}:{info.st_ino}:{path}"


def _thumbnail(
    path: Path | None, side: int = 112, digest: str | None = None
) -> tuple[str | None, bool]:
    """A JPEG data URI of the image, at most ``side`` pixels across (None if unreadable), and
    whether its content is still the one of sha256 ``digest`` (True without one)."""
    if path is None:
        return None, True
    try:
        # a JPEG is decoded at the smallest scale (1/2, 1/4, 1/8) that keeps ``side`` pixels
        decoded = decode_image(read_image_bytes(path), min_side=max(1, side // 2))
    except ImageError as exc:
        log.warning("report: no thumbnail for %s: %s", path, exc)
        return None, not digest
    image = decoded.image
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    return uri, digest in (None, decoded.sha256)


def _coordinates(sample: _Sample) -> tuple[np.ndarray, str]:
    """2-D positions of the sample: UMAP where installed (and there are enough images), else
    PCA fitted on the sample (the images shown: evenly spread over the store, and a fit
    whose cost does not grow with the store)."""
    if len(sample.ids) < 3:
        return np.zeros((len(sample.ids), 2)), "too few images to lay out"
    try:
        import umap  # noqa: PLC0415 - optional

        if len(sample.ids) >= 10:
            neighbours = min(15, len(sample.ids) - 1)
            reducer = umap.UMAP(n_components=2, n_neighbors=neighbours, random_state=0)
            return np.asarray(reducer.fit_transform(sample.vectors), float), "UMAP"
    except ImportError:
        pass
    pca = fit_pca_sample(sample.vectors, 2)
    share = 100 * pca.explained_variance_ratio.sum()
    return pca.transform(sample.vectors).astype(float), f"PCA ({share:.0f}% of the variance)"


def _map_page(store: Store, sample: _Sample, thumbnails: _Thumbnails) -> str:
    coords, method = _coordinates(sample)
    classified = any(label is not None for label in sample.labels)
    groups = sample.labels if classified else sample.folders
    counts: dict[str, int] = {}
    for group in groups:
        counts[str(group)] = counts.get(str(group), 0) + 1
    top = sorted(counts, key=lambda g: -counts[g])[:_TOP]
    colour = {group: _COLOURS[i] for i, group in enumerate(top)}
    width, height, pad = 760, 560, 20
    if len(coords):
        low, high = coords.min(axis=0), coords.max(axis=0)
        span = np.where(high - low > 0, high - low, 1)
        xy = pad + (coords - low) / span * [width - 2 * pad, height - 2 * pad]
    else:
        xy = coords
    dots = []
    thumbs = thumbnails(sample.paths, 96, sample.digests)
    for i, (x, y) in enumerate(xy):
        group = str(groups[i])
        name = _name(sample.folders[i], sample.ids[i])
        tip = html.escape(f"{name}\n{'label' if classified else 'folder'}: {group}")
        thumb = thumbs[i]
        # the thumbnail opens beside the point, kept inside the picture
        tx, ty = min(x + 8, width - 100), min(max(y - 48, 0), height - 100)
        image = f'<image href="{thumb}" x="{tx:.0f}" y="{ty:.0f}" width="96" height="96"/>'
        dots.append(
            f'<g class="pt"><title>{tip}</title><circle cx="{x:.1f}" cy="{y:.1f}" r="4" '
            f'fill="{colour.get(group, _OTHER)}"/>{image if thumb else ""}</g>'
        )
    legend = "".join(
        f'<span><i style="background:{colour[g]}"></i>{html.escape(g)} ({counts[g]})</span>'
        for g in top
    )
    if len(counts) > len(top):
        legend += f'<span><i style="background:{_OTHER}"></i>other</span>'
    body = (
        f"<p>{len(sample.ids)} images drawn at random from {len(store)} folders (the same "
        f"draw from report to report), laid out by "
        f"{method}, coloured by {'predicted label' if classified else 'folder'}. Hover over a "
        f'point for its image.</p><p class="legend">{legend}</p>'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'style="border:1px solid #ccc">{"".join(dots)}</svg>'
    )
    return _page("Map of the embeddings", body)


def _neighbours(
    store: Store, folders: dict[str, dict], sample: _Sample, queries: int, path: Path
) -> list[tuple[int, list[Hit]]]:
    """The ``_STRIP + 1`` stored images nearest each of the ``queries`` sample images of the
    lowest draws (the image itself among them), by sample index in folder order. The last
    report's are kept beside the pages: when its queries are the same and no folder it found
    them in changed, only the folders that changed since are searched, and their best are
    merged with the kept ones (:func:`~snakembed.search.best_rows` orders all rows one way,
    so the result is that of a search of every folder)."""
    picks = sorted(int(i) for i in np.argsort(sample.draws, kind="stable")[:queries])
    if not picks:
        return []
    wanted = _STRIP + 1
    # the hits' paths are the image root's: another root names them again
    identity = [*(sample.origins[i] for i in picks), wanted, str(store.images_root)]
    stamps = {key: entry["stamp"] for key, entry in folders.items()}
    kept = _load_json(path)
    searched = list(stamps)
    found: list[list] = []
    if kept.get("identity") == identity and isinstance(kept.get("stamps"), dict):
        before = kept["stamps"]
        changed = {key for key in set(stamps) | set(before) if stamps.get(key) != before.get(key)}
        if not any(hit[1] in changed for hits in kept.get("found", []) for hit in hits):
            searched = [key for key in stamps if key in changed]
            found = kept["found"]
    best = best_rows(store, unit_queries(sample.vectors[picks]), searched, wanted)
    named = {}
    for rows in best:  # only the rows found now are named
        named.update({row: hit for row, hit in zip(rows, name_hits(store, rows), strict=True)})
    for hits in found:
        named.update({(h[0], h[1], h[2]): Hit(h[0], h[1], h[3], h[4]) for h in hits})
    merged = [
        sorted({*rows, *((h[0], h[1], h[2]) for h in hits)}, reverse=True)[:wanted]
        for rows, hits in zip(best, found or [[] for _ in best], strict=True)
    ]
    keep = [[[*row, named[row].image_id, named[row].path] for row in rows] for rows in merged]
    with contextlib.suppress(OSError), atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"identity": identity, "stamps": stamps, "found": keep}))
    log.info("report: nearest neighbours searched in %d of %d folders", len(searched), len(stamps))
    return [(i, [named[row] for row in rows]) for i, rows in zip(picks, merged, strict=True)]


def _neighbours_page(
    sample: _Sample, found: list[tuple[int, list[Hit]]], thumbnails: _Thumbnails
) -> str:
    if not found:
        return _page("Nearest neighbours", "<p>No embedded images.</p>")
    strips = []
    for i, hits in found:
        name = _name(sample.folders[i], sample.ids[i])
        others = [h for h in hits if (h.folder, h.image_id) != (sample.folders[i], sample.ids[i])]
        paths = [sample.paths[i], *(root_path(h.path) for h in others[:_STRIP])]
        thumbs = thumbnails(paths, 112, [sample.digests[i], *[None] * (len(paths) - 1)])
        figures = [_figure(thumbs[0], name, "query", "query")]
        figures += [
            _figure(thumb, _name(h.folder, h.image_id), f"{h.score:.3f}", "")
            for thumb, h in zip(thumbs[1:], others[:_STRIP], strict=True)
        ]
        strips.append(f'<div class="strip">{"".join(figures)}</div>')
    body = (
        f"<p>{len(strips)} sample images (left) and the {_STRIP} most similar stored images by "
        "cosine similarity, with their scores.</p>" + "".join(strips)
    )
    return _page("Nearest neighbours", body)


def _name(folder: str, image_id: str) -> str:
    return image_id if folder == ROOT_FOLDER else f"{folder}/{image_id}"


def _figure(thumb: str | None, name: str, caption: str, css: str) -> str:
    picture = f'<img src="{thumb}" alt="{html.escape(name)}">' if thumb else "<p>(not readable)</p>"
    return (
        f'<figure class="{css}">{picture}<figcaption><b>{html.escape(caption)}</b> '
        f"{html.escape(name)}</figcaption></figure>"
    )
