"""A store in a local directory (the embedded default for ``make serve``; also fine on NFS with hard links).

Writes go to a temporary file in the target directory and appear by
``os.replace``; ``put_if_absent`` appears by ``os.link``, which fails if the
name exists, so exactly one of several racing writers wins, across processes.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .base import ObjectInfo, ObjectNotFound, ProgressCallback, Store, check_key

_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_tmp(self, path: Path, data: bytes, progress: ProgressCallback | None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                view = memoryview(data)
                for start in range(0, len(view), _CHUNK):
                    f.write(view[start : start + _CHUNK])
                    if progress is not None:
                        progress(len(view[start : start + _CHUNK]))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def put_bytes(self, key: str, data: bytes, progress: ProgressCallback | None = None) -> None:
        path = self._path(key)
        os.replace(self._write_tmp(path, data, progress), path)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._write_tmp(path, data, None)
        try:
            os.link(tmp, path)  # atomic create-if-absent, complete contents
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as e:
            raise ObjectNotFound(key) from e

    def download(self, key: str, dest: Path, progress: ProgressCallback | None = None) -> None:
        try:
            with open(self._path(key), "rb") as src, open(dest, "wb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    if progress is not None:
                        progress(len(chunk))
        except FileNotFoundError as e:
            raise ObjectNotFound(key) from e

    def copy(self, src: str, dst: str) -> None:
        src_path, dst_path = self._path(src), self._path(dst)
        dst_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst_path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            shutil.copyfile(src_path, tmp)
            os.replace(tmp, dst_path)
        except FileNotFoundError as e:
            raise ObjectNotFound(src) from e
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        # Start at the deepest directory the prefix names, then walk in key order, skipping whole
        # directories that lie outside the prefix or at or before ``start_after``.
        base = prefix.rpartition("/")[0]
        start = self.root / base if base else self.root
        yield from self._walk(start, f"{base}/" if base else "", prefix, start_after)

    def _walk(self, directory: Path, rel: str, prefix: str, start_after: str | None) -> Iterator[ObjectInfo]:
        """Keys under ``directory`` (whose keys start with ``rel``), in key order, lazily, one directory at a time."""
        try:
            with os.scandir(directory) as it:
                # A directory's keys all start with "<name>/": sorting it as "<name>/" among the files
                # gives exactly the order of the keys ("a-b" < "a.b" < "a/..." < "a0").
                entries = sorted(
                    (f"{e.name}/" if e.is_dir() else e.name, e.is_symlink())
                    for e in it
                    if not e.name.startswith(_TMP_PREFIX)
                )
        except (FileNotFoundError, NotADirectoryError):
            return
        for name, is_symlink in entries:
            key = rel + name
            if key.endswith("/"):
                if is_symlink or not (key.startswith(prefix) or prefix.startswith(key)):
                    continue
                if start_after is not None and key < start_after and not start_after.startswith(key):
                    continue  # every key inside is before start_after
                yield from self._walk(directory / name[:-1], key, prefix, start_after)
            elif key.startswith(prefix) and (start_after is None or key > start_after):
                try:
                    st = (directory / name).stat()
                except FileNotFoundError:
                    continue  # removed while listing
                yield ObjectInfo(key=key, size=st.st_size, modified=st.st_mtime)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key=key, size=st.st_size, modified=st.st_mtime)
