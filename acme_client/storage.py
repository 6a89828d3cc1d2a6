"""Where ACME state lives: a small key/value :class:`Storage` and its file implementation.

Storage is the source of truth that every process shares (the running proxy, its future
workers and replicas, ``tlsproxy renew``). Keys are ``/``-separated paths such as
``acme/<ca>/certificates/<site>/cert.pem``. The file backend writes atomically (temp file,
fsync, ``os.replace``), keeps private values 0600 in 0700 directories, and serialises
writers of one name with ``flock``. Other backends (redis) implement the same protocol;
:mod:`acme_client.location` picks one for a ``[tls] storage`` value.

This module deliberately duplicates the few lines of ``proxy.certs.pemfiles``: ``acme_client``
never imports ``proxy``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700
LOCK_POLL = 0.05  # seconds between attempts to take a busy lock

_KEY_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*")

Version = tuple[int, int, int]  # (mtime_ns, size, inode): changes whenever the value is replaced


class LockBusy(Exception):
    """Another process (or flow) holds the lock and did not release it in time."""


class Storage(Protocol):
    """Values by key, shared by every process that uses the same storage."""

    def load(self, key: str) -> bytes | None:
        """The stored value, or None when there is none."""
        ...

    def store(self, key: str, data: bytes, *, private: bool = False) -> None:
        """Replace the value atomically; ``private`` values are readable by the owner only."""
        ...

    def delete(self, key: str) -> None:
        """Remove the value (absent keys are fine)."""
        ...

    def version(self, key: str) -> Version | None:
        """A cheap token that changes when the value is replaced; None when absent."""
        ...

    def lock(self, name: str, timeout: float = 0.0) -> contextlib.AbstractContextManager[None]:
        """Hold the exclusive lock ``name`` (across processes); :class:`LockBusy` after
        ``timeout`` seconds."""
        ...

    def describe(self, key: str) -> str:
        """Where ``key`` lives, for messages (a path, a URL)."""
        ...


def check_key(key: str) -> str:
    """A key is relative, without ``..`` or empty parts: it can never escape the storage."""
    if not _KEY_RE.fullmatch(key) or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class FileStorage:
    """:class:`Storage` in a directory tree (``[tls] storage = "/var/lib/tlsproxy"``)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def describe(self, key: str) -> str:
        return str(self.path(key))

    def load(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def store(self, key: str, data: bytes, *, private: bool = False) -> None:
        path = self.path(key)
        self._make_dirs(path.parent)
        write_atomic(path, data, PRIVATE_MODE if private else PUBLIC_MODE)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def version(self, key: str) -> Version | None:
        try:
            st = self.path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    @contextlib.contextmanager
    def lock(self, name: str, timeout: float = 0.0) -> Iterator[None]:
        """``flock`` on ``<root>/locks/<name>.lock``; closing the file releases it, so a
        crashed holder never leaves a stale lock behind."""
        path = self.path(f"locks/{name}.lock")
        self._make_dirs(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    if time.monotonic() >= deadline:
                        raise LockBusy(f"{path} is held by another process") from None
                    time.sleep(LOCK_POLL)
            yield
        finally:
            os.close(fd)

    def _make_dirs(self, directory: Path) -> None:
        """Create missing directories owner-only (they hold private keys)."""
        missing = []
        current = directory
        while not current.exists():
            missing.append(current)
            if current == current.parent:
                break
            current = current.parent
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=DIR_MODE)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` so a reader sees the old bytes or the new ones, never a mix.

    The temporary file is in the same directory (``os.replace`` does not cross file systems),
    has its final mode before it gets its name (a key is never readable by others), and the
    file and directory are fsynced so the rename survives a power cut.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
