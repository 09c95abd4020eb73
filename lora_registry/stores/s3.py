"""A store in an S3 bucket (AWS S3, MinIO, or any S3-compatible service) through boto3.

Endpoint, region and credentials come from the standard AWS chain
(``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, profiles, instance
roles ...) unless given in ``S3Options``. Transient errors (5xx, throttling,
dropped connections) are retried by botocore's ``standard`` mode with
exponential backoff; short connect / read timeouts bound the time a call can
hang. After the retries, connection problems become ``RegistryUnavailableError``.

The conditional create is ``PutObject`` with ``If-None-Match: *`` (S3 since
2024, MinIO, moto >= 5): the service answers 412 if the key exists.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig

from ..errors import RegistryUnavailableError
from .base import ObjectInfo, ObjectNotFound, ProgressCallback, Store, check_key

_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_CHUNK = 1 << 20
# A listing asks for this many keys first, then four times more per request up to list_page_keys: a caller
# that needs one page of names does not pay for parsing a thousand keys, and a long scan soon reads 1000 a time.
_FIRST_LIST_PAGE_KEYS = 128


@dataclass(frozen=True)
class S3Options:
    """How to reach the bucket. ``None`` means: take it from the AWS chain."""

    endpoint_url: str | None = None
    region_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 20.0
    max_attempts: int = 3  # total tries per request, botocore "standard" retry mode
    multipart_threshold_bytes: int = 16 << 20
    list_page_keys: int = 1000  # most keys per ListObjectsV2 request (its MaxKeys; S3 returns at most 1000)

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 1 <= self.list_page_keys <= 1000:
            raise ValueError(f"list_page_keys must be in [1, 1000], got {self.list_page_keys}")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("connect_timeout_s and read_timeout_s must be > 0")

    def make_client(self):
        config = botocore.config.Config(
            retries={"total_max_attempts": self.max_attempts, "mode": "standard"},  # tries, not retries
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            max_pool_connections=32,
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region_name,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
            config=config,
        )


def _error_code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: botocore.exceptions.ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None, client=None):
        if not bucket:
            raise ValueError("S3 store needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.options = options or S3Options()
        self.client = client if client is not None else self.options.make_client()
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._transfer = TransferConfig(
            multipart_threshold=self.options.multipart_threshold_bytes,
            multipart_chunksize=8 << 20,
            max_concurrency=4,
        )

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _full(self, key_or_prefix: str) -> str:
        """The bucket key for a store key, prefix or listing bound (not checked: ``adapters/`` is one)."""
        return f"{self.prefix}/{key_or_prefix}" if self.prefix else key_or_prefix

    def _unkey(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    @contextmanager
    def _errors(self, op: str, key: str):
        """Map boto errors: missing key -> ObjectNotFound; unreachable / 5xx / auth -> RegistryUnavailableError."""
        where = f"{self.uri}/{key}"
        try:
            yield
        except botocore.exceptions.ClientError as e:
            code = _error_code(e)
            if code in _NOT_FOUND_CODES:
                raise ObjectNotFound(key) from e
            raise RegistryUnavailableError(
                f"S3 {op} {where} failed: {code or _status(e)} {e}", code="store_error"
            ) from e
        except S3UploadFailedError as e:
            raise RegistryUnavailableError(f"S3 {op} {where} failed: {e}", code="store_error") from e
        except (botocore.exceptions.BotoCoreError, OSError) as e:
            # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, NoCredentialsError, ...
            raise RegistryUnavailableError(
                f"S3 {op} {where} failed after {self.options.max_attempts} attempts: {type(e).__name__}: {e}",
                code="store_unreachable",
            ) from e

    def put_bytes(self, key: str, data: bytes, progress: ProgressCallback | None = None) -> None:
        import io

        with self._errors("upload", key):
            if len(data) < self.options.multipart_threshold_bytes:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
                if progress is not None:
                    progress(len(data))
            else:
                self.client.upload_fileobj(
                    io.BytesIO(data), self.bucket, self._key(key), Callback=progress, Config=self._transfer
                )

    def put_if_absent(self, key: str, data: bytes) -> bool:
        for attempt in range(self.options.max_attempts + 2):
            try:
                with self._errors("conditional put", key):
                    self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
                return True
            except RegistryUnavailableError as e:
                cause = e.__cause__
                if isinstance(cause, botocore.exceptions.ClientError):
                    if _error_code(cause) == "PreconditionFailed" or _status(cause) == 412:
                        return False
                    if _error_code(cause) == "ConditionalRequestConflict" or _status(cause) == 409:
                        # A concurrent conditional write to the same key is in flight: retry, then 412 or success.
                        time.sleep(0.05 * 2**attempt)
                        continue
                raise
        return False

    def get_bytes(self, key: str) -> bytes:
        with self._errors("get", key):
            return self._read_body(key, None, None)

    def download(self, key: str, dest: Path, progress: ProgressCallback | None = None) -> None:
        with self._errors("download", key), open(dest, "wb") as out:
            self._read_body(key, out, progress)

    def _read_body(self, key: str, out, progress: ProgressCallback | None) -> bytes:
        """One GET, streamed; a stream cut mid-body is retried from the start (botocore does not retry bodies)."""
        attempts = self.options.max_attempts
        for attempt in range(attempts):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
                chunks = []
                if out is not None:
                    out.seek(0)
                    out.truncate()
                for chunk in body.iter_chunks(_CHUNK):
                    if out is None:
                        chunks.append(chunk)
                    else:
                        out.write(chunk)
                    if progress is not None:
                        progress(len(chunk))
                return b"".join(chunks)
            except (
                botocore.exceptions.ResponseStreamingError,
                botocore.exceptions.IncompleteReadError,
                botocore.exceptions.ReadTimeoutError,
            ):
                if attempt == attempts - 1:
                    raise
                time.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    def copy(self, src: str, dst: str) -> None:
        with self._errors("copy", src):
            self.client.copy_object(
                Bucket=self.bucket, Key=self._key(dst), CopySource={"Bucket": self.bucket, "Key": self._key(src)}
            )

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """``ListObjectsV2`` page by page (``StartAfter`` for the first), growing from 128 keys a request to
        ``list_page_keys``: a caller that stops early stops the requests too."""
        page_keys = min(_FIRST_LIST_PAGE_KEYS, self.options.list_page_keys)
        request = {"Bucket": self.bucket, "Prefix": self._full(prefix), "MaxKeys": page_keys}
        if start_after is not None:
            request["StartAfter"] = self._full(start_after)
        while True:
            with self._errors("list", prefix):
                page = self.client.list_objects_v2(**request)
            for o in page.get("Contents", []):
                yield ObjectInfo(key=self._unkey(o["Key"]), size=o["Size"], modified=o["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return
            request.pop("StartAfter", None)
            request["ContinuationToken"] = page["NextContinuationToken"]
            request["MaxKeys"] = min(4 * request["MaxKeys"], self.options.list_page_keys)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            with self._errors("head", key):
                r = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFound:
            return None
        return ObjectInfo(key=key, size=r["ContentLength"], modified=r["LastModified"].timestamp())
