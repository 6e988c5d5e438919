"""Image trees in S3 buckets (AWS S3, MinIO, Ceph, SeaweedFS, ...): listing and reading.

An image root ``s3://BUCKET/PREFIX`` is read as a local tree is: its folders are the key
prefixes under ``PREFIX`` that directly hold image objects, keyed as local folders are
(``s3://photos/tree/people/astronaut.jpg`` is image ``astronaut.jpg`` of folder ``people``).
The plan lists the bucket once (paginated ListObjectsV2), and what the listing says of each
object (size, ETag, modification time) is its identity in the folder's manifest: a new ETag
reruns its folder, with no request per object. The folder jobs read the objects, many requests
in flight, ahead of decoding, retried with backoff on throttling, server errors and timeouts
(botocore's ``standard`` retry mode); an object that still cannot be read is a failed image
with the server's reason. Nothing is copied to local disk.

Credentials, region and endpoint come from the standard AWS sources, never from the config:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and
``~/.aws/config``, ``AWS_REGION``, and ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for
servers other than AWS. boto3 (``pip install snakembed[s3]``) does the talking; obstore,
where installed (the same extra), reads the objects, at an eighth of boto3's processor time per
request (measured: 0.17 against 1.44 ms), and any object it cannot read is asked again through
boto3, whose answer (the object's bytes or the reason) is the one kept.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from .layout import ROOT_FOLDER

__all__ = [
    "BucketError",
    "BucketUnavailable",
    "BucketPath",
    "SCHEME",
    "absolute_root",
    "is_bucket",
    "is_misspelt_bucket",
    "list_tree",
    "object_identity",
    "read_object",
    "read_ahead",
    "read_objects",
    "root_path",
]

#: How an image root in a bucket begins.
SCHEME = "s3://"

#: Requests in flight at once when a batch of objects is read.
READ_CONCURRENCY = 32

#: Prefixes listed at once at planning.
LIST_CONCURRENCY = 8


class BucketError(ValueError):
    """A bucket that cannot be listed as it is; the message names the setting to fix (the
    plan raises it as a :class:`~snakembed.images.DiscoveryError`)."""


class BucketUnavailable(RuntimeError):
    """The bucket could not be read: the S3 server could not be reached, kept failing after the
    retries, or refused these credentials. The job stops (its folders are computed by the next
    run), instead of storing images as failed that nothing would read again."""


class BucketPath(str):
    """An ``s3://`` location that joins as a :class:`~pathlib.Path` does.

    Example:
        >>> BucketPath("s3://photos/tree") / "people" / "astronaut.jpg"
        's3://photos/tree/people/astronaut.jpg'
        >>> BucketPath("s3://photos/tree/").name
        'tree'
    """

    def __truediv__(self, other) -> BucketPath:
        part = str(other)
        if part in ("", "."):
            return self
        return BucketPath(f"{self.rstrip('/')}/{part.lstrip('/')}")

    @property
    def name(self) -> str:
        return self.rstrip("/").rpartition("/")[2]

    def relative(self, location: str) -> str | None:
        """``location``'s key below this one, or None when it is not below it."""
        base = self.rstrip("/") + "/"
        return location[len(base) :] if location.startswith(base) else None


def is_bucket(root) -> bool:
    """Whether an image root (or an image) is in a bucket (``s3://...``).

    Example:
        >>> is_bucket("s3://photos/tree"), is_bucket("demo/images")
        (True, False)
    """
    return str(root).startswith(SCHEME)


#: How a bucket's location is written, for the errors of a root meant as one.
BUCKET_FORM = "s3://BUCKET/PREFIX (s3 in lower case, two slashes)"


def is_misspelt_bucket(root) -> bool:
    """Whether a root was meant as a bucket but is not written as one (``S3://``, ``s3:/``).

    Example:
        >>> is_misspelt_bucket("S3://photos"), is_misspelt_bucket("s3://photos")
        (True, False)
    """
    return str(root).lower().startswith("s3:") and not is_bucket(root)


def root_path(root):
    """An image root as the library joins it: a :class:`BucketPath` for a bucket (written one
    way: ``s3://photos/tree/`` and ``s3://photos//tree`` are ``s3://photos/tree``), else a
    :class:`~pathlib.Path`.

    Example:
        >>> root_path("s3://photos/tree/") / "a.jpg", root_path("demo/images") / "a.jpg"
        ('s3://photos/tree/a.jpg', PosixPath('demo/images/a.jpg'))
    """
    from pathlib import Path

    if not is_bucket(root):
        return Path(root)
    bucket, key = split_url(str(root))
    return BucketPath("/".join([f"{SCHEME}{bucket}", *(p for p in key.split("/") if p)]))


def absolute_root(root) -> str:
    """An image root as recorded (manifests, the index): a bucket's location written one way
    (see :func:`root_path`), a folder's absolute path.

    Example:
        >>> absolute_root("s3://photos/tree/"), absolute_root("/data/photos/")
        ('s3://photos/tree', '/data/photos')
    """
    return str(root_path(root)) if is_bucket(root) else os.path.abspath(root)


def split_url(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of an ``s3://`` location.

    Raises:
        BucketError: when it names no bucket.

    Example:
        >>> split_url("s3://photos/tree/a.jpg"), split_url("s3://photos")
        (('photos', 'tree/a.jpg'), ('photos', ''))
    """
    bucket, _, key = str(url)[len(SCHEME) :].partition("/")
    if not is_bucket(url) or not bucket:
        raise BucketError(f"{url!r} names no bucket: give images as s3://BUCKET/PREFIX")
    return bucket, key


_SESSIONS: dict[tuple, object] = {}  # by the AWS_* environment
_CLIENTS: dict[tuple, object] = {}  # by process and the AWS_* environment
_STORES: dict[tuple, object] = {}  # obstore's, by process, the AWS_* environment and bucket
_OBSTORE_PROCESS: list[int] = []  # the process whose obstore runtime started
_LOCK = threading.Lock()
# a process forked while another thread held the lock must not wait for it
os.register_at_fork(after_in_child=lambda: globals().update(_LOCK=threading.Lock()))


def _aws_environment() -> tuple:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))


def _session(environment: tuple):
    """The boto3 session of an AWS environment, its credentials resolved (call with ``_LOCK``
    held). Kept across forks: a decoding process makes its client from its parent's session in
    milliseconds, where a session of its own would load botocore's models again (a tenth of a
    second per process, per folder)."""
    session = _SESSIONS.get(environment)
    if session is None:
        try:
            import boto3
            import botocore.session
        except ImportError as exc:
            raise BucketError("images in a bucket need boto3: pip install 'snakembed[s3]'") from exc
        core = botocore.session.get_session()
        # as the AWS CLI does (awscli/customizations/scalarparse.py): botocore's own parser
        # (dateutil) takes most of a listing's time, a third of a millisecond per object
        core.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=_timestamp
        )
        session = boto3.session.Session(botocore_session=core)
        session.get_credentials()  # once, here: a profile's or an instance's take requests
        _SESSIONS.clear()
        _SESSIONS[environment] = session
    return session


def _timestamp(value):
    """A timestamp of the server's, as botocore's parser gives it (an aware datetime): ISO
    8601 (a listing's) and HTTP dates (a HEAD's) parsed by the standard library.

    Example:
        >>> _timestamp("2026-12-07T03:10:11.123Z").isoformat()
        '2026-12-07T03:10:11.123000+00:00'
        >>> _timestamp("Mon, 07 Dec 2026 03:10:11 GMT").isoformat()
        '2026-12-07T03:10:11+00:00'
    """
    from datetime import datetime
    from email.utils import parsedate_to_datetime

    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is not None:
                return parsed
        with contextlib.suppress(TypeError, ValueError):
            parsed = parsedate_to_datetime(value)
            if parsed.tzinfo is not None:
                return parsed
    from botocore.utils import parse_timestamp

    return parse_timestamp(value)


def _client():
    """This process's S3 client (thread-safe; one per process, since a forked decoding
    process must not share its parent's connections)."""
    environment = _aws_environment()
    with _LOCK:
        client = _CLIENTS.get((os.getpid(), environment))
        if client is None:
            from botocore.config import Config

            # AWS_RETRY_MODE and AWS_MAX_ATTEMPTS, where set, as botocore reads them
            retries = {
                "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                "max_attempts": _attempts(),
            }
            config = Config(
                max_pool_connections=READ_CONCURRENCY * 2,
                retries=retries,
                connect_timeout=10,
                read_timeout=60,
            )
            try:
                client = _session(environment).client("s3", config=config)
            except ValueError as exc:  # botocore's "Invalid endpoint: ..."
                variables = dict(environment)
                endpoint = variables.get("AWS_ENDPOINT_URL_S3") or variables.get("AWS_ENDPOINT_URL")
                raise BucketError(
                    f"{exc}: write AWS_ENDPOINT_URL as http://HOST:PORT or https://HOST"
                    f"{f' (it is {endpoint!r})' if endpoint else ''}"
                ) from exc
            _CLIENTS.clear()
            _CLIENTS[(os.getpid(), environment)] = client
        return client


def _reason(exc: Exception, url: str) -> str:
    """One line for what a bucket's server (or the way to it) said, with the fix."""
    from botocore import exceptions as botocore

    if isinstance(exc, botocore.NoCredentialsError | botocore.PartialCredentialsError):
        return (
            f"no AWS credentials to read {url}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f"AWS_ENDPOINT_URL={endpoint}" if endpoint else "AWS's endpoint"
    if isinstance(exc, botocore.SSLError):
        return (
            f"no TLS connection to the S3 server for {url} ({where}): {exc}; check "
            "AWS_ENDPOINT_URL (http:// or https://) and AWS_CA_BUNDLE"
        )
    if isinstance(exc, botocore.EndpointConnectionError | botocore.ConnectTimeoutError):
        return f"cannot reach the S3 server for {url} ({where}): check AWS_ENDPOINT_URL"
    if isinstance(exc, botocore.ClientError):
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "?"), (error.get("Message") or "").rstrip(". ")
        bucket = split_url(url)[0]
        fixes = {
            "NoSuchBucket": f"bucket {bucket!r} does not exist there: check `images:`",
            "AccessDenied": "these credentials may not read it: check AWS_ACCESS_KEY_ID or "
            "AWS_PROFILE, and the bucket's policy",
            "InvalidAccessKeyId": "the server knows no such key: check AWS_ACCESS_KEY_ID",
            "SignatureDoesNotMatch": "the secret key is wrong: check AWS_SECRET_ACCESS_KEY",
        }
        fix = fixes.get(code, "")
        return f"{url}: {code}{': ' + message if message else ''}{'; ' + fix if fix else ''}"
    return f"{url}: {type(exc).__name__}: {exc}"


def list_tree(root: str, extensions: Sequence[str]):
    """The folders of the image tree at ``root`` (``s3://BUCKET/PREFIX``), from one listing.

    Hidden keys (a part starting with ``.``) and keys without an image ending are skipped, as
    in a local tree; "folder" markers (keys ending in ``/``) are not images.

    Args:
        root: the image root.
        extensions: file endings that count as images, compared case-insensitively.

    Returns:
        A :class:`~snakembed.images.Discovery` whose ``identities`` hold each image's
        ``[size, ETag, modification time]``.

    Raises:
        BucketError: when the bucket cannot be listed (credentials, endpoint, a missing
            bucket, a denied prefix), naming the fix; or holds no image under ``root``.

    Example:
        >>> list_tree("s3://photos/tree", [".jpg"]).folders  # doctest: +SKIP
        {'animals': ['chelsea.jpg'], 'people': ['astronaut.jpg']}
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from .images import Discovery, check_folder_names

    bucket, prefix = split_url(root_path(root))
    prefix = f"{prefix}/" if prefix else ""
    suffixes = tuple(e.lower() for e in extensions)
    folders: dict[str, list[str]] = {}
    identities: dict[str, dict[str, list]] = {}
    try:
        for key, size, etag, modified in _objects(bucket, prefix):
            key = key[len(prefix) :]
            folder, _, name = key.rpartition("/")
            if not name.lower().endswith(suffixes) or any(
                not part or part.startswith(".") for part in key.split("/")
            ):
                continue
            folder = folder or ROOT_FOLDER
            folders.setdefault(folder, []).append(name)
            identities.setdefault(folder, {})[name] = [size, etag, modified]
    except (BotoCoreError, ClientError) as exc:
        raise BucketError(_reason(exc, root)) from exc
    if not folders:
        raise BucketError(
            f"no image objects ({', '.join(extensions)}) under {root}; check `images:` and "
            "`extensions:` in the config"
        )
    check_folder_names(folders)
    return Discovery(
        folders={key: sorted(names) for key, names in sorted(folders.items())},
        identities=identities,
    )


def _objects(bucket: str, prefix: str) -> Iterator[tuple[str, int, str, str]]:
    """``(key, size, ETag, modification time)`` of every object under ``prefix``: the objects
    directly in it, then those under each of its sub-prefixes, listed
    :data:`LIST_CONCURRENCY` prefixes at a time (a listing's pages come one after another: on a
    server far away, one prefix's pages would take a round trip each)."""
    paginator = _client().get_paginator("list_objects_v2")

    def facts(page: dict) -> list[tuple[str, int, str, str]]:
        return [
            (item["Key"], item["Size"], item["ETag"].strip('"'), item["LastModified"].isoformat())
            for item in page.get("Contents", [])
        ]

    below = []
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        yield from facts(page)
        below += [entry["Prefix"] for entry in page.get("CommonPrefixes", [])]

    def listed(sub: str) -> list[tuple[str, int, str, str]]:
        return [
            fact for page in paginator.paginate(Bucket=bucket, Prefix=sub) for fact in facts(page)
        ]

    with ThreadPoolExecutor(LIST_CONCURRENCY) as pool:
        for items in pool.map(listed, below):
            yield from items


def object_identity(url: str) -> list:
    """An object's ``[size, ETag, modification time]`` (one HEAD request), as
    :func:`list_tree` gives it.

    Raises:
        OSError: when it cannot be found or read, with the server's reason.
        BucketUnavailable: as :func:`read_object`.
    """
    bucket, key = split_url(url)
    head = _request(url, lambda client: client.head_object(Bucket=bucket, Key=key))
    return [head["ContentLength"], head["ETag"].strip('"'), head["LastModified"].isoformat()]


def _request(url: str, call):
    """``call(client)``; an object gone since the listing as OSError, anything else (the
    server, the way to it, the credentials) as :class:`BucketUnavailable`."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return call(_client())
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status == 404:  # this object, gone since the listing
            raise OSError(_reason(exc, url).removeprefix(f"{url}: ")) from exc
        # credentials refused or expired, denied, throttled, server errors: not the image's
        raise BucketUnavailable(_reason(exc, url)) from exc
    except BotoCoreError as exc:  # no connection, timeouts, no credentials
        raise BucketUnavailable(_reason(exc, url)) from exc


def read_object(url: str) -> bytes:
    """An object's bytes.

    Raises:
        OSError: when this object is gone since the listing, with the server's reason.
        BucketUnavailable: when the server cannot be reached, answers with server errors or
            throttling after the retries, or refuses these credentials (revoked, expired) or
            this object (denied): nothing the image is to blame for.
    """
    bucket, key = split_url(url)
    store = _store(bucket)
    if store is not None:
        import obstore

        try:
            return bytes(obstore.get(store, key).bytes())
        except Exception:  # noqa: BLE001 - asked again through boto3, which says what is wrong
            pass
    return _request(url, lambda client: client.get_object(Bucket=bucket, Key=key)["Body"].read())


def _store(bucket: str):
    """obstore's store for ``bucket`` in this process (its requests take an eighth of boto3's
    processor time), on the endpoint, region and credentials boto3 resolved; or None where
    obstore is not installed, where a CA bundle is set for an https endpoint
    (``AWS_CA_BUNDLE``, which obstore does not take), or in a process forked after obstore
    started its runtime in its parent (a request there would wait forever): boto3 reads
    there."""
    environment = _aws_environment()
    key = (os.getpid(), environment, bucket)
    client = _client()
    with _LOCK:
        if key in _STORES:
            return _STORES[key]
        _STORES[key] = None
        if _OBSTORE_PROCESS and _OBSTORE_PROCESS[0] != os.getpid():
            return None
        endpoint = client.meta.endpoint_url
        session = _session(environment)
        if endpoint.startswith("https://") and session._session.get_config_variable("ca_bundle"):
            return None
        try:
            from obstore.auth.boto3 import Boto3CredentialProvider
            from obstore.store import S3Store
        except ImportError:
            return None
        config = {"region": client.meta.region_name or "us-east-1"}
        if not (urlsplit(endpoint).hostname or "").endswith(".amazonaws.com"):
            config["endpoint"] = endpoint
        try:
            _STORES[key] = S3Store(
                bucket,
                config=config,
                client_options={
                    "allow_http": endpoint.startswith("http://"),
                    "connect_timeout": "10s",
                    "timeout": "60s",
                },
                retry_config={"max_retries": 0},  # boto3 retries what fails, and says why
                credential_provider=Boto3CredentialProvider(session),
            )
        except Exception:  # noqa: BLE001 - no credentials, say: boto3 reads, and says why
            return None
        _OBSTORE_PROCESS[:] = [os.getpid()]
        return _STORES[key]


def read_objects(urls: Sequence[str]) -> list[bytes | OSError]:
    """The bytes of each object (or the error that kept it from being read), in order, with
    up to :data:`READ_CONCURRENCY` requests in flight. A server that cannot be reached is
    waited for: the objects it did not give are asked again, up to ``AWS_MAX_ATTEMPTS`` (8)
    times, after 1, 2, 4 ... (at most 20) seconds, so that a restart of the server is ridden
    out (botocore's own retries give up at once when many requests fail together).

    Raises:
        BucketUnavailable: as :func:`read_object`, when the last round still fails.

    Example:
        >>> list(read_objects(["s3://photos/tree/a.jpg"]))  # doctest: +SKIP
        [b'\\xff\\xd8...']
    """

    def read(url: str) -> bytes | OSError | BucketUnavailable:
        try:
            return read_object(url)
        except (OSError, BucketUnavailable) as exc:
            return exc

    results: list = [None] * len(urls)
    todo = list(range(len(urls)))
    for attempt in range(_attempts()):
        if attempt:
            time.sleep(min(2 ** (attempt - 1), 20))
        with ThreadPoolExecutor(max(1, min(READ_CONCURRENCY, len(todo)))) as pool:
            for i, got in zip(todo, pool.map(read, [urls[i] for i in todo]), strict=True):
                results[i] = got
        todo = [i for i in todo if isinstance(results[i], BucketUnavailable)]
        if not todo:
            return results
    raise results[todo[0]]


def read_ahead(urls: Sequence[str], batch_size: int, ahead: int = 2) -> Iterator[list]:
    """The objects' bytes batch by batch, as :func:`read_objects` gives them, the next
    ``ahead`` batches read while the caller works on this one (and memory held for at most
    ``ahead + 1`` batches).

    Raises:
        BucketUnavailable: as :func:`read_objects`, when the batch that failed is reached.

    Example:
        >>> for batch in read_ahead(["s3://photos/tree/a.jpg"], 32):  # doctest: +SKIP
        ...     print([len(data) for data in batch])
        [263012]
    """
    starts = range(0, len(urls), batch_size)
    with ThreadPoolExecutor(max(1, ahead), thread_name_prefix="snakembed-bucket") as pool:
        pending = deque(
            pool.submit(read_objects, urls[start : start + batch_size]) for start in starts[:ahead]
        )
        try:
            for start in starts[ahead:]:
                batch = pending.popleft().result()
                pending.append(pool.submit(read_objects, urls[start : start + batch_size]))
                yield batch
            while pending:
                yield pending.popleft().result()
        finally:  # a caller that stops early: what is not begun is not read
            for future in pending:
                future.cancel()


def _attempts() -> int:
    """``AWS_MAX_ATTEMPTS``, as botocore reads it (default here: 8)."""
    return max(1, int(os.environ.get("AWS_MAX_ATTEMPTS", "8")))
