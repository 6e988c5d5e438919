"""Images in an S3 bucket against the same tree on local disk, on a real S3 server (SeaweedFS's
``weed mini`` on loopback, as tests/test_buckets.py starts it).

Three measurements, in one run:

- ``local`` against ``bucket``: ``snakemake --cores N`` on ``--folders`` x ``--per-folder``
  photos (500x375 JPEGs), from disk and from the bucket, A B B A (``--rounds`` times), the
  best of each; the ratio, and the seconds of each rule's jobs (where the difference goes).
- ``delay``: the bucket run again through a small proxy (here, not in the product) that holds
  every request ``--delay-ms`` (20) before passing it on, against no delay, A B B A: what many
  requests in flight buy.
- ``listing``: seconds to list ``--objects`` (100,000) small objects in 100 prefixes
  (:func:`snakembed.buckets.list_tree`), after uploading them.

Usage::

    python bench/buckets.py
    python bench/buckets.py --folders 8 --per-folder 250 --objects 20000
    python bench/buckets.py --folders 8 --per-folder 200 --delay-ms 0 --objects 0  # ratio only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3server import BUCKET, S3Server  # noqa: E402
from shards import _abba, _fresh, _rules, _snakemake  # noqa: E402
from throughput import make_tree  # noqa: E402


class DelayProxy:
    """A TCP proxy on loopback that holds each chunk a client sends for ``delay`` seconds
    before passing it to ``target``'s port (an HTTP request is one chunk or a few)."""

    def __init__(self, target: int, delay: float) -> None:
        self.target, self.delay = target, delay
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def start() -> None:
            server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            async with server:
                await server.serve_forever()

        threading.Thread(target=self.loop.run_until_complete, args=(start(),), daemon=True).start()
        ready.wait()

    async def _client(self, reader, writer) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(source, sink, delay: float) -> None:
            try:
                while chunk := await source.read(1 << 16):
                    if delay:
                        await asyncio.sleep(delay)
                    sink.write(chunk)
                    await sink.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                sink.close()

        await asyncio.gather(
            pipe(reader, upstream_writer, self.delay), pipe(upstream_reader, writer, 0.0)
        )


def _run(base: Path, images, cores: int, env: dict) -> float:
    """One run from clean results, with ``env`` (the server's variables) set."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        return _snakemake(_fresh(base), images, cores)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _rounds(rounds: int, a: str, b: str, run) -> tuple[float, float]:
    """:func:`_abba` ``rounds`` times: the best of each."""
    times = [_abba(a, b, run) for _ in range(max(1, rounds))]
    return min(t[0] for t in times), min(t[1] for t in times)


def listing(server: S3Server, objects: int) -> float:
    """Upload ``objects`` tiny objects in 100 prefixes; seconds to list them."""
    from snakembed import buckets

    client = server.client()
    names = [f"listing/p{i % 100:03d}/{i}.jpg" for i in range(objects)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=b"x"), names))
    os.environ.update(server.env)
    start = time.perf_counter()
    found = buckets.list_tree(f"s3://{BUCKET}/listing", [".jpg"])
    seconds = time.perf_counter() - start
    assert sum(map(len, found.folders.values())) == objects
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folders", type=int, default=4)
    parser.add_argument("--per-folder", type=int, default=100)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="0: no delayed runs")
    parser.add_argument("--objects", type=int, default=100_000, help="0: no listing")
    parser.add_argument("--rounds", type=int, default=1, help="A B B A rounds (a noisy machine)")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="snakembed-bench-s3-"))
    server = S3Server(base / "server")
    server.start()
    try:
        images = base / "images"
        make_tree(images, args.folders, args.per_folder, "standard")
        server.upload(images, "bench")
        total = args.folders * args.per_folder
        (base / "run").mkdir()
        bucket = f"s3://{BUCKET}/bench"

        rules: dict[str, dict[str, float]] = {}

        def local_or_bucket(name: str) -> float:
            where = str(images) if name == "local" else bucket
            since = time.time()
            seconds = _run(base / "run", where, args.cores, server.env)
            rules[name] = _rules(base / "run" / "results", since)
            return seconds

        local, remote = _rounds(args.rounds, "local", "bucket", local_or_bucket)
        print("seconds per rule (the last run of each; jobs of a rule added up):")
        for rule in sorted(rules["local"].keys() | rules["bucket"].keys()):
            print(
                f"  {rule:<12} local {rules['local'].get(rule, 0):6.1f}  "
                f"bucket {rules['bucket'].get(rule, 0):6.1f}"
            )
        best = f"best of {2 * args.rounds}"
        print(f"\n{total} photos in {args.folders} folders, --cores {args.cores}, {best}")
        print(f"  local disk: {local:.1f} s ({total / local:.1f} images/s)")
        print(f"  bucket:     {remote:.1f} s ({total / remote:.1f} images/s)")
        print(f"  bucket / local (images/s): {local / remote:.2f}x", flush=True)
        if args.delay_ms:
            proxy = DelayProxy(int(server.endpoint.rpartition(":")[2]), args.delay_ms / 1000)
            delayed = {**server.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}

            def delay_or_not(name: str) -> float:
                env = delayed if name == "delay" else server.env
                return _run(base / "run", bucket, args.cores, env)

            plain, slow = _rounds(args.rounds, "no delay", "delay", delay_or_not)
            added = f"{args.delay_ms:g} ms added to every request"
            print(f"  {added}: {slow:.1f} s against {plain:.1f} s")
            print(f"  delayed / not (images/s): {plain / slow:.2f}x")
        if args.objects:
            seconds = listing(server, args.objects)
            rate = args.objects / seconds
            print(f"  listing {args.objects:,} objects: {seconds:.1f} s ({rate:,.0f}/s)")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
