"""The report's sample and nearest neighbours after changes to the store: what a report reads
grows with the change, not with the store, and its pages equal those of a report made from
nothing on the same store."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import embedding_meta

from snakembed.embed import Embeddings
from snakembed.layout import EMBEDDINGS, INDEX_FILE, folder_file
from snakembed.reader import open_store
from snakembed.report import write_report_pages
from snakembed.search import best_rows, name_hits, search, unit_queries
from snakembed.store import write_folder, write_index

_PAGES = ("summary.html", "labels.png", "map.html", "neighbours.html")


def _folder(results: Path, key: str, vectors: np.ndarray) -> None:
    ids = [f"{i}.jpg" for i in range(len(vectors))]
    embeddings = Embeddings(
        ids=ids,
        sources=[f"{key}/{name}" for name in ids],
        sha256=[f"{key}{name}".ljust(64, "0")[:64] for name in ids],
        width=np.full(len(ids), 64),
        height=np.full(len(ids), 48),
        vectors=np.asarray(vectors, np.float32),
        meta=embedding_meta(),
    )
    output = folder_file(results, key)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_folder(embeddings, None, output, key)


def _index(results: Path) -> list[str]:
    keys = sorted(p.stem for p in (results / "embeddings").glob("*.h5"))
    write_index(keys, results.parent / "images", results / INDEX_FILE)
    return keys


def _pages(results: Path, where: Path, points: int) -> dict[str, bytes]:
    write_report_pages(results, *(where / name for name in _PAGES), points=points, queries=2)
    return {name: (where / name).read_bytes() for name in _PAGES}


def _logged(lines: list[str], what: str) -> tuple[int, int]:
    """The two numbers of the log line about ``what`` among a report's ``lines``."""
    [line] = [line for line in lines if what in line]
    return tuple(int(n) for n in re.findall(r"\d+", line)[:2])


def _report_log(caplog, write) -> list[str]:
    """The log lines of the report that ``write()`` writes (and only those)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="snakembed"):
        write()
    return [record.getMessage() for record in caplog.records]


def _hit_folders(kept: Path) -> set[str]:
    found = json.loads((kept / ".neighbours.json").read_text())["found"]
    return {hit[1] for hits in found for hit in hits}


def test_reports_after_changes_read_what_changed_and_equal_fresh_reports(tmp_path, caplog):
    """A sequence of changes, each followed by a report that keeps what the last one read
    (``kept``) and one made from nothing (``fresh/N``): the same pages every time."""
    rng = np.random.default_rng(0)
    results = tmp_path / "results"
    for i in range(30):
        _folder(results, f"f{i:02d}", rng.normal(size=(3, 8)))
    keys = _index(results)
    kept, points = tmp_path / "kept", 12
    step, logged = 0, []

    def check() -> None:
        nonlocal step
        step += 1
        again = {}
        logged[:] = _report_log(caplog, lambda: again.update(_pages(results, kept, points)))
        assert again == _pages(results, tmp_path / "fresh" / str(step), points), step

    check()
    assert _logged(logged, "folder files read") == (30, 30)
    assert _logged(logged, "nearest neighbours searched") == (30, 30)

    # one folder that gave no neighbour changes: only it is read and searched
    quiet = next(k for k in keys if k not in _hit_folders(kept))
    with h5py.File(folder_file(results, quiet), "r+") as f:
        f[EMBEDDINGS][0] = rng.normal(size=8)
    check()
    assert _logged(logged, "folder files read") == (1, 30)
    assert _logged(logged, "nearest neighbours searched") == (1, 30)
    read, sampled = _logged(logged, "of the sample's")
    assert read <= 3 and sampled == points  # the sample kept the other folders' images

    # a folder gets an exact copy of a query's neighbour: a tie, ordered as a search of all
    hit = sorted(_hit_folders(kept))[0]
    with h5py.File(folder_file(results, hit), "r") as f:
        copied = f[EMBEDDINGS][0]
    with h5py.File(folder_file(results, quiet), "r+") as f:
        f[EMBEDDINGS][1] = copied
    check()

    # a folder that gave neighbours changes: every folder is searched again
    with h5py.File(folder_file(results, hit), "r+") as f:
        f[EMBEDDINGS][...] = rng.normal(size=(3, 8))
    check()
    assert _logged(logged, "nearest neighbours searched") == (30, 30)

    # a folder added, one removed, more images than the kept candidates cover, a new size
    _folder(results, "g00", rng.normal(size=(5, 8)))
    gone = next(k for k in _index(results) if k not in _hit_folders(kept))
    folder_file(results, gone).unlink()
    _index(results)
    check()
    for i in range(40):
        _folder(results, f"h{i:02d}", rng.normal(size=(4, 8)))
    _index(results)
    check()
    points = 40
    check()
    points = 5
    check()

    # what the last report kept is unreadable, or from an older snakembed
    (kept / ".sample.npz").write_bytes(b"not an npz")
    (kept / ".neighbours.json").write_text("{")
    check()
    whole = (kept / ".sample.npz").read_bytes()
    for damaged in (b"", whole[: len(whole) // 2]):  # emptied; cut short by a copy
        (kept / ".sample.npz").write_bytes(damaged)
        check()
    entries = json.loads((kept / ".folders.json").read_text())
    for entry in entries.values():
        del entry["candidates"], entry["cap"]
    (kept / ".folders.json").write_text(json.dumps(entries))
    check()
    assert _logged(logged, "folder files read") == (len(entries), len(entries))
    # a sample far larger than the one the folders kept candidates for: they are read again
    points = 200
    check()
    assert _logged(logged, "folder files read") == (len(entries), len(entries))


def test_the_sample_follows_the_store_by_its_own_images(tmp_path, caplog):
    """Images added to a folder change the sample by those images only: the map's other
    images, their vectors and their thumbnails are kept."""
    rng = np.random.default_rng(1)
    results = tmp_path / "results"
    for i in range(50):
        _folder(results, f"f{i:02d}", rng.normal(size=(4, 8)))
    _index(results)
    kept = tmp_path / "kept"
    _pages(results, kept, 60)

    def sampled() -> set[tuple[str, int]]:
        with np.load(kept / ".sample.npz") as data:
            return {(o[0], o[2]) for o in map(json.loads, data["origins"].tolist())}

    before = sampled()
    grown = np.concatenate([h5py.File(folder_file(results, "f07"), "r")[EMBEDDINGS][()]] * 3)
    _folder(results, "f07", grown)  # eight images more; the first four are the same images
    logged = _report_log(caplog, lambda: _pages(results, kept, 60))
    after = sampled()
    assert len(after) == len(before) == 60
    entered, left = after - before, before - after
    assert entered and all(key == "f07" and row >= 4 for key, row in entered)
    assert len(left) == len(entered)  # each pushed out one image of a higher draw
    # only the rows of the rewritten folder were read again
    read, sampled_ = _logged(logged, "of the sample's")
    assert (read, sampled_) == (sum(key == "f07" for key, _ in after), 60)


@pytest.mark.parametrize("top", [1, 3, 7])
def test_the_best_of_folders_searched_apart_are_the_best_of_all(tmp_path, top):
    """best_rows orders every row one way (score, folder, row), ties included: merging the
    best of each folder gives what one search of all finds, in any order of folders."""
    rng = np.random.default_rng(2)
    results = tmp_path / "results"
    vectors = {f"f{i}": rng.normal(size=(6, 8)) for i in range(5)}
    vectors["f1"][2] = vectors["f1"][4] = vectors["f3"][0] = vectors["f0"][5]  # four ties
    for key, matrix in vectors.items():
        _folder(results, key, matrix)
    keys = _index(results)
    store = open_store(results)
    queries = unit_queries(np.stack([vectors["f0"][5], vectors["f2"][1]]))
    whole = best_rows(store, queries, keys, top)
    assert whole == best_rows(store, queries, keys[::-1], top)
    parts = [best_rows(store, queries, [key], top) for key in keys]
    merged = [
        sorted({row for part in parts for row in part[q]}, reverse=True)[:top] for q in (0, 1)
    ]
    assert merged == whole
    if top == 7:  # the four copies of the first query first
        assert {(k, r) for _, k, r in whole[0][:4]} == {("f3", 0), ("f1", 4), ("f1", 2), ("f0", 5)}
    hits = search(store, np.stack([vectors["f0"][5], vectors["f2"][1]]), top=top)
    assert [[(h.folder, h.image_id) for h in q] for q in hits] == [
        [(h.folder, h.image_id) for h in name_hits(store, rows)] for rows in whole
    ]
