"""Image trees in an S3 bucket, against a real S3 server (SeaweedFS's ``weed mini`` on
loopback): the results a local copy of the tree gives, reruns that follow the bucket, and
errors that name their fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_image, make_tree, run_snakemake, write_config
from s3server import BUCKET, OUTSIDER

import snakembed
from snakembed import buckets
from snakembed.buckets import BucketError, BucketUnavailable, list_tree, read_objects

pytestmark = pytest.mark.slow


@pytest.fixture
def server(s3_server):
    return s3_server


@pytest.fixture
def aws(server, monkeypatch):
    """This process reaches the server through the standard AWS variables (a client is made
    for each set of them)."""
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    return server


def _tree(root):
    """The conftest tree, with a file name of spaces and non-ASCII letters and two broken
    images; ``{folder: names}``."""
    folders = make_tree(root)
    make_image(root / "alpha" / "ünï cödé – photo.jpg", size=(50, 40), seed=99)
    (root / "alpha" / "empty.jpg").write_bytes(b"")
    (root / "alpha" / "text.jpg").write_text("not a jpeg")
    return folders


def _results(results) -> dict:
    """``{folder: (ids, embeddings, labels, failed)}`` of a results folder."""
    store = snakembed.open_store(results)
    out = {}
    for key in store.folders():
        with store[key] as folder:
            table = folder.table()
            out[key] = (
                list(table["image_id"]),
                np.stack(table["embedding"]) if len(table["image_id"]) else np.zeros(0),
                list(table["label"]),
                dict(folder.failed),
            )
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        ids, vectors, labels, failed = a[key]
        assert ids == b[key][0] and labels == b[key][2], key
        assert failed.keys() == b[key][3].keys(), key
        assert np.allclose(vectors, b[key][1], atol=1e-5), key


def test_a_bucket_gives_what_the_same_tree_on_disk_gives(server, tmp_path):
    local = tmp_path / "images"
    folders = _tree(local)
    server.upload(local, "same")
    # batches of 2: a folder's objects are read by decoding processes (forked by the worker)
    on_disk = write_config(tmp_path / "disk.yaml", images=str(local), results="disk", batch_size=2)
    in_bucket = write_config(
        tmp_path / "s3.yaml", images=f"s3://{BUCKET}/same", results="s3", batch_size=2
    )
    run_snakemake(tmp_path, on_disk)
    run_snakemake(tmp_path, in_bucket, env=server.env)
    got = _results(tmp_path / "s3")
    _same(got, _results(tmp_path / "disk"))
    assert set(got) == set(folders)
    assert {"empty.jpg", "text.jpg"} <= got["alpha"][3].keys()
    assert "ünï cödé – photo.jpg" in got["alpha"][0]
    store = snakembed.open_store(tmp_path / "s3")
    record = store.lookup(f"s3://{BUCKET}/same/alpha/ünï cödé – photo.jpg")
    assert record.label == store.lookup("alpha/ünï cödé – photo.jpg").label


def test_reruns_follow_the_bucket_and_equal_a_clean_run(server, tmp_path):
    """Nothing changed: nothing runs. An object replaced reruns its folder only, a prefix
    deleted removes its folder's results, a new prefix runs only its folder; and the results
    are then those of a clean run of the bucket as it is."""
    local = tmp_path / "images"
    _tree(local)
    client = server.client()
    server.upload(local, "reruns")
    config = write_config(tmp_path / "c.yaml", images=f"s3://{BUCKET}/reruns", results="r")
    run_snakemake(tmp_path, config, env=server.env)
    files = tmp_path / "r" / "embeddings"
    stamps = {p: p.stat().st_mtime_ns for p in files.rglob("*.h5")}
    again = run_snakemake(tmp_path, config, env=server.env)
    assert "nothing changed" in again.stderr
    # the root written another way is the same root
    slashed = write_config(tmp_path / "s.yaml", images=f"s3://{BUCKET}//reruns/", results="r")
    assert "nothing changed" in run_snakemake(tmp_path, slashed, env=server.env).stderr
    assert {p: p.stat().st_mtime_ns for p in files.rglob("*.h5")} == stamps

    replaced = make_image(tmp_path / "other.jpg", size=(70, 50), seed=1234)
    client.upload_file(str(replaced), BUCKET, "reruns/alpha/a1.jpg")
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="reruns/ünï cödé/")["Contents"]
    for item in listed:
        client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.upload_file(str(replaced), BUCKET, "reruns/gamma new/x.jpg")
    run_snakemake(tmp_path, config, env=server.env)
    now = {p: p.stat().st_mtime_ns for p in files.rglob("*.h5")}
    rewritten = {p.relative_to(files).as_posix() for p in now if now[p] != stamps.get(p)}
    assert rewritten == {"alpha.h5", "gamma new.h5"}
    assert not (files / "ünï cödé.h5").exists()

    clean = write_config(tmp_path / "clean.yaml", images=f"s3://{BUCKET}/reruns", results="c")
    run_snakemake(tmp_path, clean, env=server.env)
    _same(_results(tmp_path / "r"), _results(tmp_path / "c"))


def test_an_object_gone_between_listing_and_reading_is_a_failed_image(aws, tmp_path):
    make_image(tmp_path / "a.jpg")
    client = aws.client()
    client.upload_file(str(tmp_path / "a.jpg"), BUCKET, "gone/f/a.jpg")
    client.upload_file(str(tmp_path / "a.jpg"), BUCKET, "gone/f/b.jpg")
    listed = list_tree(f"s3://{BUCKET}/gone", [".jpg"])
    assert listed.folders == {"f": ["a.jpg", "b.jpg"]}
    client.delete_object(Bucket=BUCKET, Key="gone/f/b.jpg")
    read = read_objects([f"s3://{BUCKET}/gone/f/{n}" for n in listed.folders["f"]])
    assert read[0] == (tmp_path / "a.jpg").read_bytes()
    assert isinstance(read[1], OSError) and "NoSuchKey" in str(read[1])


@pytest.mark.parametrize("worker", [False, True], ids=["in the job", "by a worker"])
def test_a_server_gone_stops_the_job_and_the_next_run_finishes(
    aws, tmp_path, monkeypatch, caplog, worker
):
    """Gone while a shard's job reads its folders (computed by the job itself, or by a
    worker): no image is stored as failed, the job stops at once saying why (instead of
    trying each folder alone), and the next run, with the server back, computes what is
    left."""
    from snakembed.config import load_config
    from snakembed.pipeline import ShardError, run_shard
    from snakembed.plan import plan_run

    local = tmp_path / "images"
    for f in range(3):
        make_image(local / f"f{f}" / "0.jpg", seed=f)
    aws.upload(local, "outage")
    path = write_config(
        tmp_path / "c.yaml",
        images=f"s3://{BUCKET}/outage",
        results=str(tmp_path / "r"),
        worker={"enabled": worker, "idle": 5},
    )
    config = load_config(path)
    plan = plan_run(config)
    plan.write_manifests()
    shard = next(iter(plan.shards))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    aws.stop()
    try:
        with pytest.raises(ShardError) as stopped:
            run_shard(plan.manifest_file(shard), plan.record_file(shard), config, threads=1)
    finally:
        aws.start()
    said = str(stopped.value)
    assert "cannot reach the S3 server" in said and "check AWS_ENDPOINT_URL" in said
    assert "0 of 3 folders are stored; run snakemake again when the bucket can be read" in said
    assert "computing each alone" not in caplog.text
    assert not list((tmp_path / "r").rglob("*.h5"))
    run_snakemake(tmp_path, path, env=aws.env)
    assert set(_results(tmp_path / "r")) == {"f0", "f1", "f2"}
    assert not any(folder[3] for folder in _results(tmp_path / "r").values())

    # the report's pages, with the server gone again: written, without the bucket's thumbnails
    from snakembed.report import write_report_pages

    pages = tmp_path / "pages"
    pages.mkdir()
    names = ("summary.html", "labels.png", "map.html", "neighbours.html")
    aws.stop()
    try:
        write_report_pages(tmp_path / "r", *(pages / name for name in names))
    finally:
        aws.start()
    assert "written without the bucket's thumbnails: cannot reach the S3 server" in caplog.text
    assert "data:image/jpeg" not in (pages / "map.html").read_text()
    write_report_pages(tmp_path / "r", *(pages / name for name in names))
    assert (pages / "map.html").read_text().count("data:image/jpeg") == 3  # made now
    neighbours = (pages / "neighbours.html").read_text()  # the hits' too, from the bucket
    assert neighbours.count("<figure") == neighbours.count("data:image/jpeg") > 3


@pytest.mark.parametrize(
    "change,said",
    [
        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "check AWS_SECRET_ACCESS_KEY"),
        ({"AWS_ACCESS_KEY_ID": "nobody"}, "check AWS_ACCESS_KEY_ID"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "check AWS_ENDPOINT_URL"),
        ({"AWS_ENDPOINT_URL": "127.0.0.1:9"}, "write AWS_ENDPOINT_URL as http://HOST:PORT"),
        ({"bucket": "no-such-bucket"}, "bucket 'no-such-bucket' does not exist there"),
        ({"prefix": "nothing-here"}, "no image objects"),
        (OUTSIDER, "AccessDenied: Access Denied; these credentials may not read it"),
        ({"https": True}, "check AWS_ENDPOINT_URL (http:// or https://)"),
        ({"root": f"S3://{BUCKET}/listed"}, "s3 in lower case, two slashes"),
        ({"root": f"s3:/{BUCKET}/listed"}, "s3 in lower case, two slashes"),
    ],
    ids=[
        "secret",
        "key",
        "endpoint",
        "no scheme",
        "bucket",
        "prefix",
        "denied",
        "https",
        "S3",
        "s3:/",
    ],
)
def test_what_keeps_the_bucket_from_being_listed_stops_the_run_before_any_job(
    server, tmp_path, change, said
):
    make_image(tmp_path / "one" / "a.jpg")
    server.upload(tmp_path / "one", "listed")
    change = dict(change)
    bucket, prefix = change.pop("bucket", BUCKET), change.pop("prefix", "listed")
    root = change.pop("root", f"s3://{bucket}/{prefix}")
    if change.pop("https", False):  # a server that speaks http, asked in TLS
        change["AWS_ENDPOINT_URL"] = server.endpoint.replace("http://", "https://")
    config = write_config(tmp_path / "c.yaml", images=root, results="r")
    env = {**server.env, "AWS_MAX_ATTEMPTS": "1", **change}
    proc = run_snakemake(tmp_path, config, check=False, env=env)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if said in line]
    assert lines, proc.stderr[-3000:]
    assert not (tmp_path / "r" / "shards").exists()


def test_the_listing_is_what_the_manifests_hold(aws, tmp_path):
    """Each image's identity is the listing's size, ETag and time: no request per object."""
    make_image(tmp_path / "d" / "a.jpg")
    aws.upload(tmp_path / "d", "ids/f")
    listed = list_tree(f"s3://{BUCKET}/ids", [".JPG"])
    size, etag, modified = listed.identities["f"]["a.jpg"]
    head = aws.client().head_object(Bucket=BUCKET, Key="ids/f/a.jpg")
    assert size == (tmp_path / "d" / "a.jpg").stat().st_size
    assert etag == head["ETag"].strip('"') and modified == head["LastModified"].isoformat()
    with pytest.raises(BucketError, match="no image objects"):
        list_tree(f"s3://{BUCKET}/ids", [".png"])


@pytest.mark.parametrize(
    "change,said",
    [
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "cannot reach the S3 server"),
        ({"AWS_SECRET_ACCESS_KEY": "revoked"}, "SignatureDoesNotMatch"),
        ({"AWS_ACCESS_KEY_ID": "revoked"}, "InvalidAccessKeyId"),
        (OUTSIDER, "AccessDenied"),
    ],
    ids=["server gone", "secret changed", "key revoked", "denied"],
)
def test_what_is_not_the_image_s_fault_is_not_a_failed_image(aws, monkeypatch, change, said):
    """The server gone, or credentials revoked while a job reads: the job stops (the next run
    reads the images again), instead of storing them as failed for good."""
    aws.client().put_object(Bucket=BUCKET, Key="x/a.jpg", Body=b"a")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert read_objects([f"s3://{BUCKET}/x/a.jpg"]) == [b"a"]  # a client of the settings before
    for name, value in change.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(BucketUnavailable, match=said):
        read_objects([f"s3://{BUCKET}/x/a.jpg", f"s3://{BUCKET}/x/b.jpg"])


def test_a_server_restarted_while_a_batch_is_read_is_waited_for(aws, tmp_path):
    """botocore's retries give up at once when many requests fail together; a batch waits
    for the server in rounds (1, 2, 4 ... s)."""
    import threading
    import time

    make_image(tmp_path / "a.jpg")
    urls = []
    for i in range(40):
        aws.client().upload_file(str(tmp_path / "a.jpg"), BUCKET, f"restart/{i}.jpg")
        urls.append(f"s3://{BUCKET}/restart/{i}.jpg")
    aws.stop()
    back = threading.Timer(2.0, aws.start)
    back.start()
    start = time.monotonic()
    try:
        read = read_objects(urls)
    finally:
        back.join()
    assert all(data == (tmp_path / "a.jpg").read_bytes() for data in read)
    assert time.monotonic() - start >= 2.0  # it did wait for the server


def test_the_results_name_the_bucket_and_hold_no_secret(server, tmp_path):
    make_image(tmp_path / "t" / "f" / "a.jpg")
    server.upload(tmp_path / "t", "named")
    config = write_config(tmp_path / "c.yaml", images=f"s3://{BUCKET}/named", results="r")
    run_snakemake(tmp_path, config, env=server.env)
    manifest = json.loads(next((tmp_path / "r" / "manifests").glob("*.json")).read_text())
    assert manifest["root"] == f"s3://{BUCKET}/named"
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(manifest)
    assert server.env["AWS_SECRET_ACCESS_KEY"] not in "".join(
        p.read_text(errors="replace") for p in (tmp_path / "r").rglob("*.json")
    )
    assert str(snakembed.open_store(tmp_path / "r").images_root) == f"s3://{BUCKET}/named"


def _batches_of(batches) -> list[tuple]:
    """``(index, sha256 or error, pixels)`` of every item of some batches, in order."""
    out = []
    for batch in batches:
        pixels = iter(batch["pixels"] if batch["pixels"] is not None else [])
        for item in batch["items"]:
            have = next(pixels).numpy() if "error" not in item else None
            out.append((item["index"], item.get("sha256", "error" in item), have))
    return out


@pytest.mark.parametrize("way", ["processes", "in this process", "threads"])
def test_objects_read_ahead_decode_as_the_same_files_on_disk(aws, tmp_path, way):
    """A folder's objects are read in the job's process, ahead, and decoded where local files
    are (decoding processes, this process, threads): the same items and pixels, in order."""
    from snakembed.batches import Decoder, pillow_batches, tensor_batches
    from snakembed.buckets import root_path
    from snakembed.images import Preprocess

    local = tmp_path / "t"
    names = [f"{i:02d}.jpg" for i in range(11)]
    for i, name in enumerate(names):
        make_image(local / name, size=(40 + i, 30), seed=i)
    (local / "05.jpg").write_bytes(b"broken")
    aws.upload(local, "ahead")
    aws.client().delete_object(Bucket=BUCKET, Key="ahead/07.jpg")  # gone since the listing
    (local / "07.jpg").unlink()

    def batches(root):
        paths = [root_path(root) / name for name in names]
        decoder = Decoder(paths, Preprocess(36, 32, (0.5,) * 3, (0.5,) * 3), None, None)
        if way == "threads":
            return tensor_batches(decoder, 3, 2, "cpu", jpegs=False)
        return pillow_batches(decoder, 3, 2 if way == "processes" else 0, False)

    got = _batches_of(batches(f"s3://{BUCKET}/ahead"))
    want = _batches_of(batches(local))
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[0] for g in got] == list(range(len(names)))
    for (index, _, pixels), (_, _, same) in zip(got, want, strict=True):
        assert (pixels is None) == (same is None), index
        assert pixels is None or np.array_equal(pixels, same), index


def test_keys_a_url_would_read_otherwise_give_their_own_object(aws):
    """Keys with ``%``, ``%25``, ``#``, ``?``, ``+`` and a tab (which obstore does not take:
    boto3 reads it) each give their own bytes."""
    keys = ["odd/100%.jpg", "odd/100%25.jpg", "odd/a#b.jpg", "odd/a?b.jpg", "odd/a+b.jpg"]
    keys += ["odd/a b.jpg", "odd/tab\tx.jpg", "odd/ä.jpg"]
    client = aws.client()
    for key in keys:
        client.put_object(Bucket=BUCKET, Key=key, Body=key.encode())
    assert read_objects([f"s3://{BUCKET}/{key}" for key in keys]) == [k.encode() for k in keys]
    assert buckets._store(BUCKET) is not None  # obstore read them (a CA bundle is for https)


def test_a_process_forked_after_reading_still_reads(aws):
    """obstore cannot read in a process forked from one where it has (it would wait forever):
    boto3 reads there."""
    import multiprocessing

    aws.client().put_object(Bucket=BUCKET, Key="fork/a.jpg", Body=b"a")
    url = f"s3://{BUCKET}/fork/a.jpg"
    assert read_objects([url]) == [b"a"]
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(read_objects, ([url],)).get(timeout=60) == [b"a"]
