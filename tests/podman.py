"""Podman for the tests: a private engine, the locally made base image, the real Dockerfile.

No image registry is reachable from our machines (or CI), so the Dockerfile's ``FROM`` is
satisfied locally: ``mmdebstrap`` makes a Debian bookworm root file system with Python from
this machine's apt sources, ``podman import`` turns it into an image, and that image is
tagged with the name the Dockerfile asks for; ``--pull=never`` then resolves it locally. It
differs from the official python image (Debian's Python 3.11.2 in /usr/bin, linked into
/usr/local/bin): the Dockerfile is written to work on both.

The root file system takes about 40 s to make, so it is cached as a tar file under the
user's cache folder, named by a digest of its recipe (change the recipe, get a new one).

Every test session gets its own podman configuration, storage and temporary folder
(``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF``, ``TMPDIR``), removed at the end, so no
image, container or volume leaks between runs or into the machine's own podman. The
settings are the ones this sandbox needs (../shared/recipes/podman.md): runc, cgroupfs,
explicit ulimits, a file events log.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support import ROOT

DOCKERFILE = ROOT / "Dockerfile"
IMAGE = "localhost/tlsproxy:test"
TOOLS = ("podman", "runc", "mmdebstrap")
# The stand-in for python:3.11.x-slim-bookworm: what the official image has that tlsproxy
# needs (Python with venv and pip, CA certificates, netbase, tzdata), no manuals, docs or
# translations, merged /usr without the usrmerge package (which would pull in Perl).
RECIPE = (
    "mmdebstrap",
    "--quiet",
    "--variant=minbase",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,netbase,tzdata",
    "--customize-hook=for n in python python3 pip pip3; do"
    ' ln -sf /usr/bin/$n "$1"/usr/local/bin/$n; done',
    '--customize-hook=rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
    "bookworm",
)
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def unavailable() -> str | None:
    """Why no container engine can run here, or None when one can."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"no container engine: {', '.join(missing)} not installed (bash tests/run.sh does)"
    return None


def base_image_name() -> str:
    """The fully qualified name the Dockerfile's ``FROM ${PYTHON_IMAGE}`` resolves to."""
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("ARG PYTHON_IMAGE="):
            name = line.partition("=")[2]
            return name if "/" in name else f"docker.io/library/{name}"
    raise AssertionError("the Dockerfile has no ARG PYTHON_IMAGE")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tlsproxy-tests"


def base_rootfs() -> Path:
    """The base image's root file system as a tar file, made once per recipe."""
    digest = hashlib.sha256("\0".join(RECIPE).encode()).hexdigest()[:16]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tarball = folder / f"bookworm-python-{digest}.tar"
    with (folder / "base.lock").open("w") as lock:  # one maker at a time; others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not tarball.exists():
            partial = tarball.with_suffix(".partial.tar")
            subprocess.run([*RECIPE, str(partial)], check=True, timeout=600)
            partial.replace(tarball)
        for old in folder.glob("bookworm-python-*.tar"):
            if old != tarball and not old.name.endswith(".partial.tar"):
                old.unlink()
    return tarball


@dataclass
class Podman:
    """The ``podman`` command with this session's own configuration and storage."""

    root: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONTAINERS_CONF": str(self.root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.root / "storage.conf"),
            "TMPDIR": str(self.root / "tmp"),
        }

    def setup(self) -> None:
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        (self.root / "containers.conf").write_text(CONTAINERS_CONF)
        (self.root / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.root / "storage"}"\n'
            f'runroot = "{self.root / "run"}"\n'
        )

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def inspect(self, *args: str) -> dict[str, object]:
        """``podman inspect`` of one object, as JSON."""
        [found] = json.loads(self("inspect", *args).stdout)
        assert isinstance(found, dict)
        return found

    def import_base(self) -> float:
        """Import the cached base root file system under the Dockerfile's FROM name; seconds."""
        started = time.monotonic()
        tarball = base_rootfs()
        self("import", str(tarball), "localhost/bookworm-python:test", timeout=300)
        self("tag", "localhost/bookworm-python:test", base_image_name())
        return time.monotonic() - started

    def build(self, tag: str = IMAGE) -> float:
        """Build the repository's Dockerfile as the README says, offline for the base; seconds.

        The build's pip reaches PyPI through this machine's outbound proxy, which may present
        its own CA: the host's bundle is mounted and named in PIP_CERT, and the machine's
        package index settings are passed on when they are URLs a container can reach.
        """
        args = ["build", "--pull=never", "--format", "docker", "--tag", tag]
        if HOST_CA_BUNDLE.exists():
            args += [
                "--volume",
                f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro",
                "--build-arg",
                f"PIP_CERT={HOST_CA_BUNDLE}",
            ]
        for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
            urls = [u for u in os.environ.get(name, "").split() if u.startswith("http")]
            if urls:
                args += ["--build-arg", f"{name}={' '.join(urls)}"]
        started = time.monotonic()
        self(*args, str(ROOT), timeout=600)
        return time.monotonic() - started

    def image_size(self, name: str) -> int:
        size = self.inspect("--type", "image", name)["Size"]
        assert isinstance(size, int)
        return size

    def service(self, endpoint: str, log: Path) -> subprocess.Popen[bytes]:
        """``podman system service``: the Docker-compatible API on ``endpoint``
        (``unix:///path`` or ``tcp:127.0.0.1:port``), until stopped."""
        with log.open("ab") as output:
            process = subprocess.Popen(
                ["podman", "system", "service", "--time=0", endpoint],
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 15
        while not _answers(endpoint):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"podman system service did not start:\n{log.read_text()}")
            time.sleep(0.05)
        return process

    def teardown(self) -> None:
        """Remove every container, image and volume of this session, then its folder."""
        with contextlib.suppress(subprocess.SubprocessError, AssertionError):
            self("rm", "--all", "--force", "--time", "0", check=False)
            self("system", "reset", "--force", check=False, timeout=120)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_podman() -> Iterator[Podman]:
    """A Podman with its own configuration and storage, removed afterwards."""
    podman = Podman(Path(tempfile.mkdtemp(prefix="tlsproxy-podman-", dir="/var/tmp")))
    podman.setup()
    try:
        yield podman
    finally:
        podman.teardown()


def _answers(endpoint: str) -> bool:
    """Whether the API at ``endpoint`` accepts connections."""
    family, address = (
        (socket.AF_UNIX, endpoint.removeprefix("unix://"))
        if endpoint.startswith("unix://")
        else (socket.AF_INET, tuple(endpoint.removeprefix("tcp:").rsplit(":", 1)))
    )
    target: str | tuple[str, int] = (
        address if isinstance(address, str) else (address[0], int(address[1]))
    )
    with socket.socket(family) as sock:
        try:
            sock.connect(target)
        except OSError:
            return False
    return True


def wait_logged(podman: Podman, container: str, text: str, timeout: float = 20) -> str:
    """The container's log once it contains ``text``."""
    deadline = time.monotonic() + timeout
    while True:
        result = podman("logs", container, check=False)
        log = result.stdout + result.stderr
        if text in log:
            return log
        if time.monotonic() > deadline:
            raise TimeoutError(f"{container!r} did not log {text!r}:\n{log}")
        time.sleep(0.1)


def run_args(name: str, environment: dict[str, str], extra: Sequence[str] = ()) -> list[str]:
    """``podman run`` arguments for a detached, named container with ``-e`` variables."""
    args = ["run", "--detach", "--name", name]
    for key, value in environment.items():
        args += ["--env", f"{key}={value}"]
    return [*args, *extra]
