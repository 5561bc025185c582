"""Where stream snapshots live: a local directory, or an fsspec URL (object storage, a shared filesystem).

`open_store(where)`: a path -> `LocalStore` (what ``serve --state-dir`` has always done: owner-only files
written to a temporary name, fsynced and renamed, so a reader sees the old file or the new one); a URL
with a scheme (``s3://bucket/prefix``, ``gs://...``, ``memory://...``, ``file:///...``) -> `FsspecStore`
on that fsspec filesystem (``pip install s3fs`` or the like for the scheme; fsspec itself comes with
torch). An object store's put is atomic per object, so a snapshot there is also whole or absent.

Both take and give a snapshot by its file name (``STREAM.state.safetensors``) and raise OSError for any
failure to read or write, which the engine reports (``status``' ``persist_error``) and survives.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(where: str) -> bool:
    return bool(_URL.match(where))


class LocalStore:
    """Snapshots in a local (or mounted shared) directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)  # OSError: the caller says which option

    def where(self, name: str) -> str:
        return str(self.root / name)

    def write(self, name: str, data: bytes) -> None:
        path = self.root / name
        tmp = path.with_name(path.name + ".tmp")
        try:
            # Owner only: a saved request keeps the source's URI with its credentials (to reconnect).
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                os.fchmod(f.fileno(), 0o600)  # also a leftover temporary file made with other permissions
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def names(self, suffix: str) -> list[str]:
        return sorted(p.name for p in self.root.glob(f"*{suffix}") if p.is_file())

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


class FsspecStore:
    """Snapshots under an fsspec URL; every filesystem error comes out as OSError naming the URL."""

    def __init__(self, url: str):
        try:
            import fsspec
        except ImportError as exc:  # pragma: no cover (torch depends on fsspec)
            raise OSError(f"state store {url!r} needs fsspec (pip install fsspec)") from exc
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
            self.fs.makedirs(self.root, exist_ok=True)
        except (ImportError, ValueError) as exc:  # an unknown scheme, or its package missing
            raise OSError(f"state store {url!r}: {exc}") from exc
        self.root = self.root.rstrip("/")

    def where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _call(self, what: str, name: str, fn, *args):
        try:
            return fn(*args)
        except OSError:
            raise
        except Exception as exc:  # backends raise their own errors (botocore's ...): one kind for the engine
            raise OSError(f"could not {what} '{self.where(name)}': {type(exc).__name__}: {exc}") from exc

    def write(self, name: str, data: bytes) -> None:
        self._call("write", name, self.fs.pipe_file, self._path(name), data)

    def read(self, name: str) -> bytes:
        return self._call("read", name, self.fs.cat_file, self._path(name))

    def names(self, suffix: str) -> list[str]:
        found = self._call("list", "", self.fs.glob, f"{self.root}/*{suffix}")
        return sorted(p.rsplit("/", 1)[-1] for p in found)

    def exists(self, name: str) -> bool:
        return bool(self._call("look for", name, self.fs.exists, self._path(name)))

    def size(self, name: str) -> int:
        return int(self._call("stat", name, self.fs.size, self._path(name)))

    def remove(self, name: str) -> None:
        if self.exists(name):
            self._call("remove", name, self.fs.rm_file, self._path(name))


def open_store(where: str) -> LocalStore | FsspecStore:
    """The store for ``--state-dir`` / ``--state-store``: a URL with a scheme through fsspec, else a directory.
    OSError when it cannot be made or reached."""
    return FsspecStore(where) if is_url(where) else LocalStore(where)
