"""S3-compatible object storage: `s3://bucket/prefix` URLs, whole-object reads and writes, and the
conditional writes the stage locks are built on.

Credentials, region and endpoint come from the standard AWS environment and files (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL, ~/.aws/config),
never from the experiment config. Every failure that a user fixes outside the program (wrong
credentials, endpoint, bucket) is an ObjectStoreError with one line that says what to check.

What S3 guarantees and what this module relies on: a PUT publishes the whole object or nothing (no
reader ever sees a partial object), a read after a successful write sees it, and a PUT with
`If-None-Match: *` (create only) or `If-Match: <etag>` (replace only that version) is refused with
412 when the condition fails, atomically on the server (AWS S3 since 2024, MinIO, moto).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEME = "s3://"
SINGLE_PUT_MAX = 5 * 2**30  # S3's largest single PUT; larger files would need multipart (not used)
_CLIENTS: dict[tuple[int, str | None], Any] = {}


class ObjectStoreError(RuntimeError):
    """The object store refused or could not be reached; the message is one line for the user."""


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (create) or changed (replace)."""


def is_url(path: str | os.PathLike | None) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


@dataclass(frozen=True)
class ObjectURL:
    """`s3://bucket/prefix` split; `key(rel)` is the object key of a path relative to the prefix."""

    bucket: str
    prefix: str  # no leading or trailing "/"

    @classmethod
    def parse(cls, url: str) -> ObjectURL:
        if not is_url(url):
            raise ValueError(f"{url!r} is not an s3:// URL")
        bucket, _, prefix = url[len(SCHEME):].partition("/")
        if not bucket:
            raise ValueError(f"{url!r} names no bucket (expected s3://bucket/prefix)")
        return cls(bucket, prefix.strip("/"))

    def key(self, rel: str = "") -> str:
        rel = rel.strip("/")
        return "/".join(p for p in (self.prefix, rel) if p)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}".rstrip("/")


def endpoint() -> str | None:
    """The endpoint of an S3-compatible server (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL), None for AWS."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def client() -> Any:
    """This process's boto3 S3 client (standard AWS credential chain; rebuilt after a fork)."""
    key = (os.getpid(), endpoint())
    if key not in _CLIENTS:
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                        max_pool_connections=32)
        _CLIENTS[key] = boto3.session.Session().client("s3", endpoint_url=endpoint(), region_name=region(),
                                                        config=config)
    return _CLIENTS[key]


def _explain(exc: BaseException, what: str) -> ObjectStoreError:
    """One line for a failed request on `what` (an s3:// URL)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = endpoint() or "AWS S3"
    if isinstance(exc, NoCredentialsError):
        return ObjectStoreError(f"{what}: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                "(or AWS_PROFILE)")
    if isinstance(exc, EndpointConnectionError):
        return ObjectStoreError(f"{what}: cannot reach the object store at {where}: check AWS_ENDPOINT_URL")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AccessDenied",
                    "403") or status == 403:
            return ObjectStoreError(f"{what}: the object store at {where} refused the credentials ({code or status}): "
                                    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE")
        if code in ("NotImplemented", "501") or status == 501:
            return ObjectStoreError(f"{what}: the object store at {where} does not implement a request this pipeline "
                                    "needs (conditional writes: If-None-Match / If-Match on PUT); use a server that does")
        if code == "NoSuchBucket":
            return ObjectStoreError(f"{what}: bucket {ObjectURL.parse(what).bucket!r} does not exist at {where}")
        return ObjectStoreError(f"{what}: the object store at {where} answered {code or status}")
    return ObjectStoreError(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _call(what: str, fn: Any, **kwargs: Any) -> Any:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kwargs)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412") or \
                exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
            raise PreconditionFailed(what) from None
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            raise FileNotFoundError(what) from None
        raise _explain(exc, what) from None
    except BotoCoreError as exc:
        raise _explain(exc, what) from None


# ----------------------------------------------------------------------------------------------
#                                          Objects
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # without quotes; the MD5 of the bytes for objects written by single PUTs


def check_access(url: ObjectURL) -> None:
    """Raise ObjectStoreError (one line) unless the bucket of `url` is reachable with these credentials."""
    c = client()
    try:
        _call(str(url), c.head_bucket, Bucket=url.bucket)
    except FileNotFoundError:  # HeadBucket's 404 carries no error code
        raise ObjectStoreError(f"{url}: bucket {url.bucket!r} does not exist at {endpoint() or 'AWS S3'}") from None


def list_objects(url: ObjectURL, rel: str = "") -> Iterator[ObjectInfo]:
    """Every object under `url`/`rel` (recursive), keys relative to url's prefix."""
    c = client()
    base = url.key(rel)
    prefix = base + "/" if base else ""
    token: dict[str, str] = {}
    strip = len(url.prefix) + 1 if url.prefix else 0
    while True:
        page = _call(f"{url}/{rel}", c.list_objects_v2, Bucket=url.bucket, Prefix=prefix, **token)
        for o in page.get("Contents", []):
            if o["Key"].endswith("/"):
                continue  # a folder marker (written by some tools, e.g. Ray's storage), not a file
            yield ObjectInfo(o["Key"][strip:], int(o["Size"]), o["ETag"].strip('"'))
        if not page.get("IsTruncated"):
            return
        token = {"ContinuationToken": page["NextContinuationToken"]}


def head(url: ObjectURL, rel: str) -> ObjectInfo | None:
    """The object at `url`/`rel`, or None when there is none."""
    try:
        r = _call(f"{url}/{rel}", client().head_object, Bucket=url.bucket, Key=url.key(rel))
    except FileNotFoundError:
        return None
    return ObjectInfo(rel, int(r["ContentLength"]), r["ETag"].strip('"'))


def get_bytes(url: ObjectURL, rel: str) -> tuple[bytes, str]:
    """(bytes, etag) of an object; FileNotFoundError when it does not exist."""
    r = _call(f"{url}/{rel}", client().get_object, Bucket=url.bucket, Key=url.key(rel))
    return r["Body"].read(), r["ETag"].strip('"')


def put_bytes(url: ObjectURL, rel: str, data: bytes, *, if_none_match: bool = False,
              if_match: str | None = None) -> str:
    """Publish `data` as one object (whole or not at all); returns its etag. `if_none_match`: only if
    no object is there; `if_match`: only if the object still has that etag (else PreconditionFailed)."""
    cond: dict[str, str] = {}
    if if_none_match:
        cond["IfNoneMatch"] = "*"
    if if_match is not None:
        cond["IfMatch"] = f'"{if_match}"'
    r = _call(f"{url}/{rel}", client().put_object, Bucket=url.bucket, Key=url.key(rel), Body=data, **cond)
    return r["ETag"].strip('"')


def put_file(url: ObjectURL, rel: str, path: Path) -> str:
    """Upload a local file as one object with a single PUT (so its etag is its MD5)."""
    size = path.stat().st_size
    if size > SINGLE_PUT_MAX:
        raise ObjectStoreError(f"{path}: {size} bytes is over the 5 GiB of one PUT; lower stores.samples_per_shard")
    with open(path, "rb") as f:
        r = _call(f"{url}/{rel}", client().put_object, Bucket=url.bucket, Key=url.key(rel), Body=f)
    return r["ETag"].strip('"')


def get_file(url: ObjectURL, rel: str, path: Path) -> None:
    """Download an object into `path` atomically (temporary sibling, then rename)."""
    from pipeline.stores.atomic import atomic_write_with

    r = _call(f"{url}/{rel}", client().get_object, Bucket=url.bucket, Key=url.key(rel))
    body = r["Body"]
    atomic_write_with(path, lambda f: [f.write(chunk) for chunk in iter(lambda: body.read(8 << 20), b"")])


def delete(url: ObjectURL, rel: str, *, if_match: str | None = None) -> None:
    """Delete an object (absent is fine); `if_match`: only while it still has that etag."""
    cond = {"IfMatch": f'"{if_match}"'} if if_match is not None else {}
    try:
        _call(f"{url}/{rel}", client().delete_object, Bucket=url.bucket, Key=url.key(rel), **cond)
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------------------------
#                                   Tensorstore's own driver
# ----------------------------------------------------------------------------------------------


def tensorstore_kvstore(url: ObjectURL) -> dict[str, Any]:
    """The tensorstore `s3` kvstore spec of `url` (the same endpoint, region and credential chain)."""
    spec: dict[str, Any] = {"driver": "s3", "bucket": url.bucket, "path": url.key() + "/", "aws_region": region()}
    if endpoint():
        spec["endpoint"] = endpoint()
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        spec["aws_credentials"] = {"type": "environment"}
    return spec
