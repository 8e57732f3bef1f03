"""Shared bytes on S3-compatible object storage (``storage.object_store``, docs/scale.md): nodes on
one database with separate data folders exchange received instances and outputs through it.

Keys are the file's path relative to the data folder under the configured prefix: a received
instance ``spool/<study>/<series>/<sop>.dcm``, an output ``outbox/<job>/...``. Requests are retried
by botocore's standard retry mode, which retries transient errors only (connection errors,
throttling, 5xx), never a refused credential or a missing key. Transfers of many files run on a
thread pool (``max_parallel``). The credentials are never logged."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from node.errors import StoreError
from node.settings import ObjectStoreSettings

log = logging.getLogger(__name__)
#: What the store answers when the credentials are refused (AWS S3, MinIO, SeaweedFS).
_REFUSED = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken", "403"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


class ObjectStoreError(StoreError):
    """The object store could not do what was asked; the message says what (no key material).
    Transient for the runner (a job retries with back-off)."""


class ObjectMissing(ObjectStoreError):
    """No object under that key."""


class ObjectStoreUnreachable(ObjectStoreError):
    """The store did not answer (connection refused, timed out), after the retries."""


class ObjectStore:
    """A bucket (and prefix) of an S3-compatible store."""

    def __init__(self, settings: ObjectStoreSettings) -> None:
        import boto3
        from botocore.config import Config

        self.settings = settings
        self.bucket = settings.bucket
        self._prefix = settings.prefix
        verify: bool | str = settings.verify_tls
        if settings.verify_tls and settings.ca_file is not None:
            verify = str(settings.ca_file)
        config = Config(
            region_name=settings.region,
            connect_timeout=settings.timeout_s,
            read_timeout=settings.timeout_s,
            retries={"mode": "standard", "max_attempts": settings.max_attempts},
            max_pool_connections=max(10, settings.max_parallel),
            s3={"addressing_style": "path"},
        )
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint_url or None,
            aws_access_key_id=settings.access_key.get_secret_value() if settings.access_key else None,
            aws_secret_access_key=settings.secret_key.get_secret_value() if settings.secret_key else None,
            verify=verify,
            config=config,
        )
        self._pool = ThreadPoolExecutor(settings.max_parallel, thread_name_prefix="objects")

    @property
    def identity(self) -> str:
        """Endpoint, bucket and prefix (what nodes sharing the store compare)."""
        return self.settings.identity()

    def key(self, name: str) -> str:
        """The full key of ``name`` (a path relative to the data folder)."""
        return self._prefix + name

    def _error(self, exc: Exception, action: str, name: str) -> ObjectStoreError:
        from botocore.exceptions import ClientError

        where = f"{self.settings.endpoint_url or 'S3'} bucket {self.bucket!r}"
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                return ObjectMissing(f"object store {where}: no object {self.key(name)!r} ({action})")
            if code in _REFUSED:
                return ObjectStoreError(
                    f"object store {where} refused the credentials ({code}) on {action}: check "
                    "storage.object_store.access_key and secret_key"
                )
            if code == "NoSuchBucket":
                return ObjectStoreError(f"object store {where}: the bucket does not exist ({action})")
            return ObjectStoreError(f"object store {where}: {action} {self.key(name)!r} failed: {code}")
        return ObjectStoreUnreachable(f"object store {where}: {action} failed: {type(exc).__name__}: {exc}")

    def check(self) -> None:
        """Raise ObjectStoreError unless the bucket answers with these credentials (at start)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            err = self._error(exc, "checking the bucket", "")
            if isinstance(err, ObjectMissing):  # HEAD answers a bare 404 for a missing bucket
                err = ObjectStoreError(
                    f"object store {self.settings.endpoint_url or 'S3'}: no bucket {self.bucket!r}"
                )
            raise err from None

    def put(self, name: str, path: Path) -> None:
        """Upload the file at ``path`` as ``name``."""
        try:
            with path.open("rb") as body:
                self._client.put_object(Bucket=self.bucket, Key=self.key(name), Body=body)
        except OSError:
            raise
        except Exception as exc:
            raise self._error(exc, "upload", name) from None

    def put_bytes(self, name: str, data: bytes) -> None:
        """Upload ``data`` as ``name``."""
        try:
            self._client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data)
        except Exception as exc:
            raise self._error(exc, "upload", name) from None

    def get(self, name: str, dest: Path) -> int:
        """Download ``name`` to ``dest`` (written beside it, then renamed: a reader never sees a
        part); returns its size. Raises ObjectMissing when there is no such object."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self.key(name))
            size = 0
            with tmp.open("wb") as out:
                for chunk in answer["Body"].iter_chunks(1 << 20):
                    out.write(chunk)
                    size += len(chunk)
            os.replace(tmp, dest)
            return size
        except OSError:
            raise
        except Exception as exc:
            raise self._error(exc, "download", name) from None
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, name: str) -> bytes:
        """The content of ``name``."""
        try:
            return bytes(self._client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read())
        except Exception as exc:
            raise self._error(exc, "download", name) from None

    def exists(self, name: str) -> bool:
        """True when there is an object ``name``."""
        try:
            self._client.head_object(Bucket=self.bucket, Key=self.key(name))
        except Exception as exc:
            err = self._error(exc, "looking up", name)
            if isinstance(err, ObjectMissing):
                return False
            raise err from None
        return True

    def delete(self, name: str) -> None:
        """Remove ``name`` (no error when it is already gone)."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.key(name))
        except Exception as exc:
            raise self._error(exc, "delete", name) from None

    def parallel(self, fn: Any, args: Iterable[tuple[Any, ...]]) -> list[Any]:
        """``fn(*a)`` for each ``a`` on the pool; raises the first error once all have ended."""
        futures = [self._pool.submit(fn, *a) for a in args]
        results, first = [], None
        for future in futures:
            try:
                results.append(future.result())
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first
        return results

    def put_many(self, files: Sequence[tuple[str, Path]]) -> None:
        """Upload (name, path) pairs in parallel."""
        self.parallel(self.put, files)

    def get_many(self, files: Sequence[tuple[str, Path]]) -> int:
        """Download (name, destination) pairs in parallel; the bytes fetched."""
        return sum(self.parallel(self.get, files))

    def delete_many(self, names: Iterable[str]) -> None:
        """Remove objects in parallel."""
        self.parallel(self.delete, ((n,) for n in names))

    def close(self) -> None:
        """Stop the transfer threads."""
        self._pool.shutdown(wait=True)


def instance_key(path: str) -> str:
    """The name of a received instance (``Instance.path``, relative to the spool)."""
    return f"spool/{path}"


class ObjectCache:
    """Local copies of objects under ``root`` (data_dir/cache), at most ``max_bytes`` after each
    :meth:`trim` (oldest used first). Files are written atomically, so a copy is whole or absent."""

    def __init__(self, store: ObjectStore, root: Path, max_bytes: int) -> None:
        self.store = store
        self.root = root
        self.max_bytes = max_bytes

    def path(self, name: str) -> Path:
        """Where the copy of ``name`` lives."""
        return self.root / name

    def ensure(self, names: Sequence[str]) -> dict[str, Path]:
        """Local paths of ``names``, fetching in parallel those not cached yet."""
        paths = {n: self.path(n) for n in names}
        missing = [(n, p) for n, p in paths.items() if not p.is_file()]
        for p in paths.values():
            if p.is_file():
                os.utime(p)  # used now: trimmed last
        if missing:
            size = self.store.get_many(missing)
            log.info("object store: fetched %d objects (%.1f MB) into the cache", len(missing), size / 1e6)
        return paths

    def trim(self, keep: Iterable[Path] = ()) -> int:
        """Remove the oldest used copies until the cache holds at most ``max_bytes`` (``keep`` stays);
        returns the bytes removed."""
        kept = set(keep)
        files = []
        for p in self.root.rglob("*") if self.root.exists() else ():
            if p.is_file() and p not in kept:
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files) + sum(p.stat().st_size for p in kept if p.is_file())
        removed = 0
        for _, size, p in sorted(files):
            if total - removed <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            removed += size
        return removed
