"""Folder jobs in shards: stable assignment, the index redone only where folders changed, a
rerun's cost in what changed, a failed folder that loses nothing, and `info` never stale."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import (
    assert_same_results,
    make_image,
    python_in_new_process,
    run_snakemake,
    write_config,
)

import snakembed
from snakembed.cli import main
from snakembed.layout import folder_file
from snakembed.plan import plan_run
from snakembed.reader import NO_FILE, tree_status
from snakembed.shards import assign_shards, shard_count, shard_name, shard_of
from snakembed.store import stored_state, update_index, write_index

# --- the assignment ------------------------------------------------------------------------


def test_one_folder_added_removed_or_renamed_moves_at_most_two_shards():
    rng = random.Random(0)
    keys = [f"cam{rng.randrange(50):02d}/day{i:04d}" for i in range(3000)]
    before = assign_shards(keys, 16)
    for change in ("add", "remove", "rename"):
        after_keys = list(keys)
        if change in ("remove", "rename"):
            after_keys.remove(keys[1234])
        if change in ("add", "rename"):
            after_keys.append("cam07/day1234a")  # sorts right beside an existing folder
        after = assign_shards(after_keys, 16)
        moved = {s for s in before.keys() | after.keys() if before.get(s) != after.get(s)}
        assert 1 <= len(moved) <= (2 if change == "rename" else 1), change


def test_shards_are_the_same_in_every_process():
    keys = [f"folder{i}" for i in range(200)]
    here = [shard_of(key, 64) for key in keys]
    code = f"from snakembed.shards import shard_of\nprint([shard_of(k, 64) for k in {keys!r}])"
    assert python_in_new_process(code).strip() == str(here)
    assert len(set(here)) > 32  # spread, not all in one


def test_the_count_doubles_with_the_tree_and_holds_until_it_doubles_again():
    size = {"max_folders": 100, "max_images": 10_000}
    assert shard_count(100, 0, **size) == 1
    assert shard_count(101, 0, **size) == 2
    assert shard_count(5, 25_000, **size) == 4  # images bound it too
    assert shard_count(3, 3, least=3, **size) == 4  # one per job the cores run at once
    # kept while the tree is more than a quarter of what the count holds, and fits it
    assert shard_count(101, 0, previous=4, **size) == 4
    assert shard_count(400, 0, previous=4, **size) == 4
    assert shard_count(100, 0, previous=4, **size) == 1
    assert shard_count(401, 0, previous=4, **size) == 8
    assert shard_count(101, 0, previous=3, **size) == 2  # not a power of two: not kept
    assert shard_name(0, 16) == "01-of-16"


# --- the index, updated where folders changed --------------------------------------------------


def _links(path: Path) -> dict[str, tuple[str, str]]:
    """Every external link of an index: ``{its path: (file, path in the file)}``."""
    out = {}
    with h5py.File(path, "r") as f:

        def walk(group, prefix):
            for name in group:
                link = group.get(name, getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    out[prefix + name] = (link.filename, link.path)
                else:
                    walk(group[name], f"{prefix}{name}/")

        walk(f, "")
        out["@folders"] = tuple(json.loads(f.attrs["folders"]))
    return out


def _folder_file(results: Path, key: str, ids: list[str]) -> None:
    path = folder_file(results, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("_ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())


def test_an_updated_index_links_as_one_written_anew(tmp_path):
    """Folders added, removed and changed, a folder that gains and then loses folders below
    it, the root's own images: after each change the updated index holds the same links as an
    index written from scratch."""
    rng = random.Random(1)
    results = tmp_path / "results"
    names = [".", "a", "a/b", "a/b/c", "a/d", "e", "e/f", "g", "h/i", "h/j/k"]
    current: dict[str, str] = {}
    for step in range(40):
        key = rng.choice(names)
        if key in current and rng.random() < 0.4:
            del current[key]
        else:
            ids = [f"{rng.randrange(5)}.jpg" for _ in range(rng.randrange(1, 4))]
            _folder_file(results, key, sorted(set(ids)))
            current[key] = f"digest{step}"
        update_index(current, tmp_path / "images", results / "index.h5")
        write_index(current, tmp_path / "images", results / "fresh.h5")
        assert _links(results / "index.h5") == _links(results / "fresh.h5"), (step, current)


def test_an_index_of_another_root_is_written_anew_and_an_unchanged_one_is_kept(tmp_path):
    results = tmp_path / "results"
    _folder_file(results, "a", ["0.jpg"])
    assert update_index({"a": "1"}, tmp_path / "one", results / "index.h5") == "written"
    assert update_index({"a": "1"}, tmp_path / "one", results / "index.h5") == "unchanged"
    assert update_index({"a": "2"}, tmp_path / "one", results / "index.h5") == "unchanged"
    assert update_index({"a": "2"}, tmp_path / "two", results / "index.h5") == "written"


# --- the plan ----------------------------------------------------------------------------------


def _tree(root: Path, folders: int, per_folder: int = 2) -> None:
    for i in range(folders):
        for j in range(per_folder):
            make_image(root / f"f{i:02d}" / f"{j}.jpg", seed=i * 10 + j)


def test_the_plan_says_what_changed_in_words(tmp_path):
    _tree(tmp_path / "images", 6)
    config = {"images": str(tmp_path / "images"), "results": str(tmp_path / "results")}
    plan = plan_run(dict(config))
    plan.write_manifests()
    assert plan.changes.line() == "6 folders to compute; 1 shard to run"
    _store_as_planned(plan)
    plan = plan_run(dict(config))
    plan.write_manifests()
    assert plan.changes.line() == "nothing changed: every folder is up to date"
    make_image(tmp_path / "images" / "f01" / "new.jpg", seed=99)
    shutil.rmtree(tmp_path / "images" / "f02")
    make_image(tmp_path / "images" / "f03" / "0.jpg", seed=98)  # rewritten
    plan = plan_run(dict(config))
    plan.write_manifests()
    assert plan.changes.line() == (
        "3 folders changed: f01 (+1 image), f02 (removed), f03 (1 image rewritten); 1 shard to run"
    )
    assert plan.changes.pending == {"1-of-1": ["f01", "f03"]}


def test_a_regrouped_tree_says_why_its_shards_run_and_counts_only_what_changed(tmp_path):
    """The shard count changes (here by the config; with auto, when the tree outgrows its
    shards): the run says the folders were regrouped, and its progress counts the images of
    the folders that changed, not of every shard that runs."""
    _tree(tmp_path / "images", 6)
    config = {"images": str(tmp_path / "images"), "results": str(tmp_path / "results")}
    plan = plan_run({**config, "shards": {"count": 2}})
    plan.write_manifests()
    _store_as_planned(plan)
    make_image(tmp_path / "images" / "f09" / "0.jpg", seed=90)
    again = plan_run({**config, "shards": {"count": 4}})
    again.write_manifests()
    line = again.changes.line()
    assert line.startswith("1 folder changed: f09 (new, 1 image); ")
    assert "regrouped from 2 shards into 4" in line
    assert sum(again.pending_images(shard) for shard in again.shards) == 1
    stale = again.stale_lines(again.stale_files())
    assert stale and all("shard file" in s and "planned: 4 shards now" in s for s in stale)
    # nothing changed, regrouped again: said so, and nothing to embed
    _store_as_planned(again)
    third = plan_run({**config, "shards": {"count": 8}})
    third.write_manifests()
    assert third.changes.line().startswith("no folder changed; ")
    assert "shards to run (the folders regrouped from 4 shards into 8: " in third.changes.line()
    assert sum(third.pending_images(shard) for shard in third.shards) == 0


def _store_as_planned(plan) -> None:
    """Write each folder's file and the shards' records as a shard job would."""
    from snakembed.pipeline import _recorded
    from snakembed.shards import read_shard_manifest, write_record

    for shard in plan.shards:
        manifest = read_shard_manifest(plan.manifest_file(shard))
        record = {}
        for key, entry in manifest.folders.items():
            _folder_file(plan.results, key, sorted(entry["images"]))
            with h5py.File(folder_file(plan.results, key), "a") as f:
                f.attrs["manifest_sha256"] = entry["digest"]
            path = folder_file(plan.results, key)
            record[key] = _recorded(entry, entry["digest"], path, stored_state(path)[1])
        write_record(plan.record_file(shard), manifest.settings, record)


def test_a_file_removed_or_replaced_by_hand_runs_its_shard_again(tmp_path):
    _tree(tmp_path / "images", 4)
    config = {
        "images": str(tmp_path / "images"),
        "results": str(tmp_path / "results"),
        "shards": {"count": 2},
    }
    plan = plan_run(dict(config))
    plan.write_manifests()
    _store_as_planned(plan)
    victim = "f01"
    folder_file(plan.results, victim).unlink()
    again = plan_run(dict(config))
    again.write_manifests()
    shard = shard_name(shard_of(victim, 2), 2)
    assert again.changes.shards == {shard} and again.changes.pending == {shard: [victim]}
    assert not again.record_file(shard).exists()  # set aside: Snakemake runs the shard
    assert tree_status(plan.results).pending == {victim: NO_FILE}


# --- real runs ---------------------------------------------------------------------------------


def _mtimes(results: Path) -> dict[str, int]:
    return {
        p.relative_to(results / "embeddings").as_posix(): p.stat().st_mtime_ns
        for p in (results / "embeddings").rglob("*.h5")
        if p.is_file()
    }


@pytest.mark.slow
def test_a_failed_folder_loses_nothing_and_info_names_what_is_pending(tmp_path, capsys):
    """One folder's file cannot be written: the shard's other folders are stored, the run
    fails naming the folder, `info` names it pending, and the next run computes only it, to
    the same results as a clean run."""
    _tree(tmp_path / "images", 6)
    config = write_config(
        tmp_path / "c.yaml",
        images=str(tmp_path / "images"),
        results="results",
        shards={"count": 1},
    )
    results = tmp_path / "results"
    blocker = folder_file(results, "f03")
    blocker.mkdir(parents=True)  # a folder where the file goes: renaming over it fails
    (blocker / "keep").touch()
    proc = run_snakemake(tmp_path, config, check=False)
    assert proc.returncode != 0
    log = (results / "logs" / "embed_classify_store" / "1-of-1.log").read_text()
    assert "shard 1-of-1: 1 of 6 folders failed (f03)" in log
    assert sorted(_mtimes(results)) == [f"f{i:02d}.h5" for i in range(6) if i != 3]
    assert main(["info", "--results", str(results)]) == 0
    info = capsys.readouterr().out
    assert "folders: 6, images: 10, failed: 0, pending: 1" in info
    shard_log = results / "logs" / "embed_classify_store" / "1-of-1.log"
    assert f"f03: pending ({NO_FILE}; log: {shard_log})" in info
    assert "index.h5 is behind" in info
    store = snakembed.open_store(results)
    assert store.folders() == [f"f{i:02d}" for i in range(6) if i != 3]

    shutil.rmtree(blocker)
    before = _mtimes(results)
    out = run_snakemake(tmp_path, config)
    assert "1 folder changed: f03 (new, 2 images); 1 shard to run" in out.stdout + out.stderr
    after = _mtimes(results)
    assert {k for k in after if before.get(k) != after[k]} == {"f03.h5"}
    clean_config = write_config(
        tmp_path / "clean.yaml", images=str(tmp_path / "images"), results="clean"
    )
    run_snakemake(tmp_path, clean_config)
    assert_same_results(results, tmp_path / "clean")
    status = tree_status(results)
    assert status.pending == {} and not status.index_behind


@pytest.mark.slow
def test_a_change_reruns_only_its_shard_and_only_its_folder(tmp_path):
    _tree(tmp_path / "images", 12, per_folder=1)
    config = write_config(
        tmp_path / "c.yaml",
        images=str(tmp_path / "images"),
        results="results",
        shards={"count": 4},
    )
    results = tmp_path / "results"
    run_snakemake(tmp_path, config)
    logs = results / "logs" / "embed_classify_store"
    first = {p.name: p.stat().st_mtime_ns for p in logs.iterdir()}
    assert len(first) == len({shard_of(f"f{i:02d}", 4) for i in range(12)}) > 1
    before = _mtimes(results)
    make_image(tmp_path / "images" / "f05" / "new.jpg", seed=77)
    dry = run_snakemake(tmp_path, config, "--dry-run")
    assert "1 folder changed: f05 (+1 image); 1 shard to run" in dry.stdout + dry.stderr
    assert _mtimes(results) == before  # a dry run computes nothing
    run_snakemake(tmp_path, config)
    after = _mtimes(results)
    assert {k for k in after if before[k] != after[k]} == {"f05.h5"}
    ran = {p.name for p in logs.iterdir() if p.stat().st_mtime_ns != first[p.name]}
    assert ran == {f"{shard_name(shard_of('f05', 4), 4)}.log"}
    # a new shard count reshuffles folders: every shard job only finds its files up to date
    reshuffled = write_config(
        tmp_path / "c8.yaml",
        images=str(tmp_path / "images"),
        results="results",
        shards={"count": 8},
    )
    run_snakemake(tmp_path, reshuffled)
    assert _mtimes(results) == after
    assert sorted(p.name for p in logs.iterdir()) == sorted(
        {f"{shard_name(shard_of(f'f{i:02d}', 8), 8)}.log" for i in range(12)}
    )
    clean = write_config(tmp_path / "clean.yaml", images=str(tmp_path / "images"), results="cl")
    run_snakemake(tmp_path, clean)
    assert_same_results(results, tmp_path / "cl")
    assert tree_status(results).pending == {}


def test_a_report_after_a_change_reads_only_the_changed_folder_and_equals_a_fresh_one(
    workflow_run, tmp_path, caplog
):
    """The report's pages keep what they need of each folder between reports; a folder file
    that changed is read again, and the pages equal those of a report made from nothing."""
    import logging

    from snakembed.layout import LABELS
    from snakembed.report import write_report_pages

    results = shutil.copytree(workflow_run["results"], tmp_path / "results")
    shutil.rmtree(results / "report")

    def pages(where: Path) -> dict[str, bytes]:
        names = ("summary.html", "labels.png", "map.html", "neighbours.html")
        write_report_pages(results, *(where / name for name in names))
        return {name: (where / name).read_bytes() for name in names}

    first = pages(tmp_path / "kept")
    with h5py.File(folder_file(results, "alpha"), "r+") as f:
        f[LABELS][0] = "zebra"  # another label for one image
    with caplog.at_level(logging.INFO, logger="snakembed"):
        again = pages(tmp_path / "kept")
    n = len(workflow_run["folders"])
    assert f"report: 1 of {n} folder files read" in caplog.text
    fresh = pages(tmp_path / "fresh")
    assert again == fresh
    assert again["labels.png"] != first["labels.png"]
