"""The Python API over the results: open_store, folders, records, matrix, lookup, dataframe."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

import snakembed
from snakembed.layout import folder_file


@pytest.fixture(scope="module")
def store(workflow_run):
    return snakembed.open_store(workflow_run["results"])


def test_folders_and_ids(store, workflow_run):
    assert store.folders() == sorted(workflow_run["folders"])
    assert len(store) == len(workflow_run["folders"])
    assert "alpha" in store and "nope" not in store
    for key, names in workflow_run["folders"].items():
        assert store[key].ids() == sorted(names)


def test_matrix_rows_follow_ids(store):
    folder = store["alpha"]
    matrix = folder.matrix()
    assert matrix.dtype == np.float32 and matrix.shape == (3, 512)
    for row, image_id in zip(matrix, folder.ids(), strict=True):
        assert np.array_equal(row, folder[image_id].embedding)


def test_image_record(store, workflow_run):
    record = store["alpha/deep/b c"]["x 1.jpg"]
    assert record.folder == "alpha/deep/b c" and record.image_id == "x 1.jpg"
    assert record.source == "alpha/deep/b c/x 1.jpg"
    assert record.embedding.shape == (512,)
    assert record.label == record.topk[0][0] and record.score == pytest.approx(record.topk[0][1])
    assert len(record.topk) == 3
    assert record.patches is not None
    assert record.patches.embeddings.shape == (len(record.patches.boxes), 512)
    assert len(record.sha256) == 64


def test_failed_images_and_their_reasons(store, workflow_run):
    failed = store["alpha"].failed
    assert set(failed) == workflow_run["bad"]
    with pytest.raises(KeyError, match="it failed"):
        store["alpha"]["empty.jpg"]
    with pytest.raises(KeyError, match="no such image"):
        store["alpha"]["missing.jpg"]
    assert store["ünï cödé"].failed == {}


def test_lookup_by_relative_and_absolute_path(store, workflow_run):
    by_rel = store.lookup("ünï cödé/é.jpg")
    by_abs = store.lookup(workflow_run["images"] / "ünï cödé" / "é.jpg")
    assert np.array_equal(by_rel.embedding, by_abs.embedding)
    assert store.lookup("top.jpg").folder == "."
    with pytest.raises(KeyError):
        store.lookup("nowhere/x.jpg")
    with pytest.raises(KeyError, match="not under the image root"):
        store.lookup("/somewhere/else.jpg")


def test_to_dataframe(store, workflow_run):
    frame = store.to_dataframe()
    n = sum(len(v) for v in workflow_run["folders"].values())
    assert len(frame) == n
    assert {"folder", "image_id", "source", "label", "score", "embedding"} <= set(frame.columns)
    row = frame[(frame.folder == "alpha") & (frame.image_id == "a2.png")].iloc[0]
    assert np.array_equal(row.embedding, store["alpha"]["a2.png"].embedding)
    assert row.label == store["alpha"]["a2.png"].label


def test_provenance_attrs(store, workflow_run, resnet18_checkpoint):
    import hashlib
    from importlib.metadata import version

    from snakembed.config import load_config, numbers_fingerprint

    attrs = store["alpha"].attrs
    assert attrs["model"] == "resnet18" and attrs["embedding_dim"] == 512
    assert attrs["layer"] == "pre_logits"
    assert attrs["weights"] == str(resnet18_checkpoint)
    assert attrs["weights_sha256"] == hashlib.sha256(resnet18_checkpoint.read_bytes()).hexdigest()
    assert attrs["versions"] == {
        name: version(name) for name in ("snakembed", "torch", "torchvision", "timm")
    }
    assert attrs["snakembed_version"] == version("snakembed")
    assert attrs["preprocess"]["resize"] == 64 and attrs["preprocess"]["crop"] == 56
    assert attrs["patches"] == {"resize": 64, "size": 32, "stride": 32, "border": "shift"}
    config = load_config(workflow_run["config"])
    assert attrs["config_hash"] == numbers_fingerprint(config)["hash"]
    assert attrs["num_failed"] == 3


def test_store_without_index_scans_the_files(workflow_run, tmp_path):
    import shutil

    copy = tmp_path / "results"
    shutil.copytree(workflow_run["results"] / "embeddings", copy / "embeddings")
    store = snakembed.open_store(copy)
    assert store.folders() == sorted(workflow_run["folders"])


def test_open_store_on_a_folder_without_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the workflow first"):
        snakembed.open_store(tmp_path)


def test_files_are_never_left_half_written(tmp_path, monkeypatch):
    """A writer that fails leaves the old file whole; one that succeeds puts its data on the
    disk before the rename, and the rename before it returns."""
    from snakembed import _files

    target = tmp_path / "out" / "a.h5"
    target.parent.mkdir()
    target.write_text("old")
    with pytest.raises(RuntimeError), _files.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and list(target.parent.iterdir()) == [target]

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with _files.atomic_path(target) as tmp:
        tmp.write_text("new")
        written = str(tmp)
    assert target.read_text() == "new"
    assert events == [("fsync", written), ("replace", str(target)), ("fsync", str(target.parent))]


def test_a_damaged_file_names_itself_and_the_fix(workflow_run, tmp_path):
    from snakembed.reader import Folder, StoreError

    source = folder_file(workflow_run["results"], "alpha")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(source.read_bytes()[:2000])
    with pytest.raises(StoreError, match=r"truncated.h5 is not a readable snakembed file.*delete"):
        Folder(truncated, "alpha")
    with pytest.raises(StoreError, match=r"gone.h5 does not exist; run the workflow"):
        Folder(tmp_path / "gone.h5", "alpha")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(3)
    with pytest.raises(StoreError, match="not a snakembed folder file"):
        Folder(foreign, "alpha")
    newer = tmp_path / "newer.h5"
    newer.write_bytes(source.read_bytes())
    with h5py.File(newer, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="upgrade snakembed"):
        Folder(newer, "alpha")


def test_a_missing_folder_file_is_reported_through_the_store(workflow_run, tmp_path):
    import shutil

    from snakembed.reader import NO_FILE

    copy = tmp_path / "results"
    shutil.copytree(workflow_run["results"], copy)
    folder_file(copy, "alpha").unlink()
    store = snakembed.open_store(copy)
    assert "alpha" not in store and store.status.pending == {"alpha": NO_FILE}
    with pytest.raises(KeyError, match="folder 'alpha' is pending .*run the workflow"):
        store["alpha"]


def test_a_damaged_shape_that_declares_more_rows_than_the_file_holds_is_refused(tmp_path):
    """A few flipped bytes in a dataset's shape can declare billions of rows: the reader
    refuses them (naming the file) instead of allocating and reading them for minutes."""
    from test_fuzz import _seed_contents  # a small folder with every part

    from snakembed.reader import Folder, StoreError
    from snakembed.store import read_earlier, write_folder

    path = tmp_path / "f.h5"
    contents = _seed_contents()
    write_folder(*contents, path, "f")
    assert read_earlier(path, contents[0].meta) is not None
    with h5py.File(path, "r+") as f:
        for name in [name for name in f if name.startswith("_")]:  # the bulk datasets
            shape, dtype = (10**9, *f[name].shape[1:]), f[name].dtype
            del f[name]
            f.create_dataset(name, shape=shape, dtype=dtype, chunks=True)  # never written
    with pytest.raises(StoreError, match="more than the file"):
        Folder(path, "f")  # refused when opened, before anything is read
    with pytest.raises(StoreError, match=str(path)):
        snakembed.reader.matrix_view(path)
    # a shard job reusing the folder's earlier embeddings embeds every image again instead
    assert read_earlier(path, contents[0].meta) is None
