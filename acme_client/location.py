"""Where ``[tls] storage`` points, parsed once into a value: a directory or a Redis URL.

Every part of the proxy used to ask ``"://" in storage`` on its own (eight places, with two
different answers for an unknown scheme). A :class:`StorageLocation` says it once: its
``kind``, the directory when it is one, and why it cannot be used when it cannot.
:func:`open_storage` is the one place that turns a location into a backend, so
:mod:`acme_client.storage` no longer imports the Redis backend that imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from acme_client.redis_storage import SCHEMES, RedisStorage, redacted, url_problem
from acme_client.storage import FileStorage, Storage

Kind = Literal["directory", "redis", "unsupported"]


@dataclass(frozen=True, slots=True)
class StorageLocation:
    """``[tls] storage`` as the user wrote it, and what kind of place it is."""

    text: str
    kind: Kind

    @property
    def directory(self) -> Path | None:
        """The directory, or None for a URL (no local files: no internal CA, no snapshots)."""
        return Path(self.text) if self.kind == "directory" else None

    @property
    def shared_url(self) -> bool:
        """True for a Redis URL: state shared by replicas, reached over the network."""
        return self.kind == "redis"

    def problem(self) -> str | None:
        """Why this location cannot be used (judged from the text alone), or None."""
        return None if self.kind == "directory" else url_problem(self.text)

    def __str__(self) -> str:
        """For messages: a URL without its password."""
        return self.text if self.kind == "directory" else redacted(self.text)


def parse_location(text: str) -> StorageLocation:
    """A directory path, or a ``redis://``/``rediss://`` URL; any other ``scheme://`` is
    ``unsupported`` (its :meth:`~StorageLocation.problem` says so)."""
    if "://" not in text:
        return StorageLocation(text, "directory")
    scheme = urlsplit(text).scheme.lower()
    return StorageLocation(text, "redis" if scheme in SCHEMES else "unsupported")


def open_storage(location: StorageLocation | str) -> Storage:
    """The backend for a location: :class:`FileStorage` or :class:`RedisStorage`."""
    if isinstance(location, str):
        location = parse_location(location)
    if location.kind == "directory":
        return FileStorage(location.text)
    if location.kind == "redis":
        return RedisStorage(location.text)
    raise ValueError(f"storage {location}: {location.problem()}")
