"""Finding or installing what the suite drives (Debian packages, mitmproxy in its own
virtualenv, a session-dropping shim for wrk), and describing the machine it ran on."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
MITMPROXY_SPEC = "mitmproxy>=11,<12"

# command -> Debian package that provides it
PACKAGES = {
    "wrk": "wrk",
    "h2load": "nghttp2-client",
    "nginx": "nginx",
    "haproxy": "haproxy",
    "caddy": "caddy",
    "cc": "gcc",
    "taskset": "util-linux",
}


class Installer:
    """Finds commands, installing missing ones with apt-get when allowed and possible.

    ``notes`` collects one line per thing that could not be had, for the report.
    """

    def __init__(self, *, allowed: bool) -> None:
        self.allowed = allowed and os.geteuid() == 0 and shutil.which("apt-get") is not None
        self._updated = False
        self.notes: list[str] = []

    def find(self, command: str) -> str | None:
        """The path of ``command``, installing its package first if it is missing."""
        found = shutil.which(command)
        if found or not self.allowed:
            return found
        package = PACKAGES.get(command, command)
        print(f"installing {package} (apt-get) ...", flush=True)
        if not self._apt_install(package):
            self._updated = True
            _quiet(["apt-get", "update", "-qq"], timeout=300)
            self._apt_install(package)
        return shutil.which(command)

    def _apt_install(self, package: str) -> bool:
        """One ``apt-get install``; services it would start are none of ours to run."""
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        return _quiet(["apt-get", "install", "-y", "-qq", package], timeout=600, env=env)


def _quiet(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> bool:
    """Run a command, output discarded; True on exit status 0."""
    try:
        result = subprocess.run(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout, env=env
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def nosession_shim(installer: Installer) -> Path | None:
    """Build (once) the LD_PRELOAD library that makes wrk do a full TLS handshake on every
    reconnect: wrk keeps the session across ``SSL_clear`` and would resume it otherwise."""
    target = CACHE / "nosession.so"
    source = HERE / "nosession.c"
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return target
    compiler = installer.find("cc")
    if compiler is None:
        return None
    CACHE.mkdir(exist_ok=True)
    ok = _quiet([compiler, "-O2", "-shared", "-fPIC", "-o", str(target), str(source), "-ldl"], 120)
    return target if ok else None


def mitmdump(*, install: bool) -> tuple[Path | None, str]:
    """mitmdump from the suite's own virtualenv (it pins its own dependencies), created on
    first use; returns (path or None, why not)."""
    venv = CACHE / "mitmproxy-venv"
    binary = venv / "bin" / "mitmdump"
    if binary.exists():
        return binary, ""
    if not install:
        return None, f"not installed in {venv} (run without --no-install)"
    print(f"installing {MITMPROXY_SPEC} into {venv} (pip) ...", flush=True)
    CACHE.mkdir(exist_ok=True)
    pip = venv / "bin" / "pip"
    steps = [[sys.executable, "-m", "venv", str(venv)], [str(pip), "install", "-q", MITMPROXY_SPEC]]
    for step in steps:
        if not _quiet(step, timeout=900):
            return None, f"`{' '.join(step)}` failed"
    return binary, ""


def version_of(argv: list[str]) -> str:
    """The first line a ``--version``-style command prints (stdout or stderr)."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (result.stdout + result.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def machine() -> dict[str, object]:
    """What a reader needs to judge the numbers: cores, CPU, kernel, OS, memory, Python."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "os": _os_name(),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "python": platform.python_version(),
        "uvloop": _dist_version("uvloop"),
        "httptools": _dist_version("httptools"),
        "h11": _dist_version("h11"),
        "openssl_python": ssl.OPENSSL_VERSION,
        "wrk": version_of(["wrk", "--version"]).split(" [")[0],
        "h2load": version_of(["h2load", "--version"]) if shutil.which("h2load") else "none",
        "loadavg_start": list(os.getloadavg()),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _os_name() -> str:
    with contextlib.suppress(OSError):
        match = re.search(r'^PRETTY_NAME="?([^"\n]*)', Path("/etc/os-release").read_text(), re.M)
        if match:
            return match.group(1)
    return platform.system()


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def source_state(root: Path) -> dict[str, str]:
    """The git commit the proxy was measured at, and whether the tree had local changes."""
    commit = version_of(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    try:
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "proxy", "acme_client"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        status = ""
    return {"commit": commit, "proxy_changes": "local changes" if status.strip() else "clean"}
