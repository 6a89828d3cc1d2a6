"""Certificate and key files on disk: written atomically, with the right permissions.

A reader (another worker, a restart after a crash, ``tlsproxy renew``) must never see a
half-written PEM file or a key readable by others, even for an instant.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

KEY_MODE = 0o600  # private keys: owner only
CERT_MODE = 0o644  # certificates are public
DIR_MODE = 0o700  # directories holding keys


def write_atomic(path: Path | str, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` so readers see the old file or the new one, never a mix.

    The temporary file lives in the same directory (``os.replace`` must not cross file
    systems), gets its final ``mode`` before the rename (a key is never world-readable), and
    both the file and the directory are fsynced so the rename survives a power cut.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def make_private_dir(path: Path | str) -> Path:
    """Create ``path`` (and parents) and make it owner-only: it holds private keys."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(DIR_MODE)
    return path


@contextlib.contextmanager
def locked(lock_path: Path | str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``: one process creates or re-issues at a time.

    Workers sharing a storage directory would otherwise race to create, say, two different
    internal root CAs.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
