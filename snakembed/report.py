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
import html
import io
import json
import logging
import os
import threading
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
from .search import search

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
    """Images drawn evenly from the whole store, with their vectors."""

    folders: list[str]
    ids: list[str]
    paths: list[Path | None]
    digests: list[str]
    labels: list[str | None]
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
        points: images drawn for the map, evenly across the store.
        queries: sample images for the neighbour strips.
        metrics: the trained head's ``metrics.json``, or None.

    Example:
        >>> write_report_pages("results", "s.html", "l.png", "m.html", "n.html")  # doctest: +SKIP
    """
    from .embed import log_to_stderr

    log_to_stderr()
    store = open_store(results)
    folders = _read_folders(store, Path(embedding_map).parent / _FOLDERS)
    _write_text(summary, _summary_page(folders, Path(results), metrics))
    _plot_labels(folders, labels)
    sample = _sample(store, folders, points)
    thumbnails = _Thumbnails(Path(embedding_map).parent / _THUMBNAILS)
    _write_text(embedding_map, _map_page(store, sample, thumbnails))
    _write_text(neighbours, _neighbours_page(store, sample, queries, thumbnails))
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


def _read_folders(store: Store, path: Path) -> dict[str, dict]:
    """What the pages need of each folder (its provenance, failures and label counts), read
    from the folder files that changed since the last report and kept beside the pages: a
    one-folder change reads one folder file."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = {}
    kept = kept if isinstance(kept, dict) else {}
    folders, read = {}, 0
    for key in store:
        stamp = _file_key(folder_file(store.results, key))
        entry = kept.get(key)
        if not isinstance(entry, dict) or entry.get("stamp") != stamp or stamp is None:
            with store[key] as folder:
                attrs = folder.attrs
                labels = folder.table(embeddings=False)["label"]
            entry = {
                "stamp": stamp,
                "attrs": {name: attrs.get(name) for name in _FACTS},
                "labels": Counter(_NOT_CLASSIFIED if label is None else label for label in labels),
            }
            read += 1
        folders[key] = entry
    with contextlib.suppress(OSError), atomic_path(path) as tmp:
        tmp.write_text(json.dumps(folders))
    log.info(
        "report: %d of %d folder files read (the others kept from the last report)",
        read,
        len(folders),
    )
    return folders


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


def _sample(store: Store, read: dict[str, dict], points: int) -> _Sample:
    """Up to ``points`` images, evenly spaced over the store in folder order (``read``: see
    :func:`_read_folders`)."""
    sizes = {key: entry["attrs"]["num_images"] for key, entry in read.items()}
    total = sum(sizes.values())
    picks = np.unique(np.linspace(0, total - 1, min(points, total)).round().astype(int))
    folders, ids, paths, digests, labels, vectors = [], [], [], [], [], []
    start = 0
    for key, size in sizes.items():
        lo, hi = np.searchsorted(picks, [start, start + size])
        rows = picks[lo:hi] - start
        start += size
        if not len(rows):
            continue
        with store[key] as folder:
            table = folder.table(embeddings=False)
        matrix = store.view(key)
        for row in rows:
            folders.append(key)
            ids.append(table["image_id"][row])
            root = store.images_root
            paths.append(root / table["source"][row] if root else None)
            digests.append(table["sha256"][row])
            labels.append(table["label"][row])
            vector = np.asarray(matrix[row], np.float32)
            vectors.append(vector.mean(axis=0) if vector.ndim == 2 else vector)  # maps: mean
    dim = len(vectors[0]) if vectors else 0
    vectors = np.asarray(vectors, np.float32).reshape(-1, dim)
    return _Sample(folders, ids, paths, digests, labels, vectors)


#: What the pages need of each folder, kept from the last report (see :func:`_read_folders`).
_FOLDERS = ".folders.json"

#: The attributes of a folder file that the pages show.
_FACTS = (
    "num_images", "num_failed", "failed", "model", "weights", "layer", "embedding_dim", "classify"
)  # fmt: skip

_NOT_CLASSIFIED = "(not classified)"

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
        try:
            self._kept = json.loads(path.read_text())
        except (OSError, ValueError):
            self._kept = {}
        if not isinstance(self._kept, dict):
            self._kept = {}
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
        f"<p>{len(sample.ids)} images drawn evenly from {len(store)} folders, laid out by "
        f"{method}, coloured by {'predicted label' if classified else 'folder'}. Hover over a "
        f'point for its image.</p><p class="legend">{legend}</p>'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'style="border:1px solid #ccc">{"".join(dots)}</svg>'
    )
    return _page("Map of the embeddings", body)


def _neighbours_page(
    store: Store, sample: _Sample, queries: int, thumbnails: _Thumbnails, top: int = 6
) -> str:
    if not sample.ids:
        return _page("Nearest neighbours", "<p>No embedded images.</p>")
    picks = np.unique(np.linspace(0, len(sample.ids) - 1, min(queries, len(sample.ids))).round())
    found = search(store, sample.vectors[picks.astype(int)], top=top + 1)
    strips = []
    for i, hits in zip(picks.astype(int), found, strict=True):
        name = _name(sample.folders[i], sample.ids[i])
        others = [h for h in hits if (h.folder, h.image_id) != (sample.folders[i], sample.ids[i])]
        paths = [sample.paths[i], *(root_path(h.path) for h in others[:top])]
        thumbs = thumbnails(paths, 112, [sample.digests[i], *[None] * (len(paths) - 1)])
        figures = [_figure(thumbs[0], name, "query", "query")]
        figures += [
            _figure(thumb, _name(h.folder, h.image_id), f"{h.score:.3f}", "")
            for thumb, h in zip(thumbs[1:], others[:top], strict=True)
        ]
        strips.append(f'<div class="strip">{"".join(figures)}</div>')
    body = (
        f"<p>{len(strips)} sample images (left) and the {top} most similar stored images by "
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
