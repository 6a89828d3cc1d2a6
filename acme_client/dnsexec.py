"""DNS-01 records through the user's own program (lego's ``exec`` provider is the model).

``command = ["/usr/local/bin/acme-dns-hook"]`` is run as
``/usr/local/bin/acme-dns-hook present _acme-challenge.example.com. <value>`` and later
``... cleanup _acme-challenge.example.com. <value>``, so any DNS host can be reached without
code of ours. Exit status 0 means done; anything else fails the order, with the end of what
the program wrote to stderr in the error. The propagation check runs afterwards as for every
provider.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from acme_client.solvers import SolverError

EXEC_TIMEOUT = 60.0  # seconds one run of the program may take
STDERR_SHOWN = 300  # characters of its stderr kept in an error


class ExecProvider:
    """Runs ``command present|cleanup FQDN VALUE``."""

    def __init__(self, command: Sequence[str], timeout: float = EXEC_TIMEOUT) -> None:
        if not command:
            raise ValueError("the exec provider needs a command")
        self.command = tuple(command)
        self.timeout = timeout

    def describe(self) -> str:
        return f"exec {self.command[0]}"

    def add(self, zone: str, fqdn: str, value: str, ttl: int) -> None:
        self._run("present", fqdn, value)

    def remove(self, zone: str, fqdn: str, value: str) -> None:
        self._run("cleanup", fqdn, value)

    def _run(self, action: str, fqdn: str, value: str) -> None:
        argv = [*self.command, action, fqdn, value]
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise SolverError(
                f"exec: {self.command[0]} {action} {fqdn} did not finish within {self.timeout:g} s"
            ) from None
        except OSError as exc:
            raise SolverError(
                f"exec: cannot run {self.command[0]}: {exc.strerror or exc}"
            ) from None
        if result.returncode != 0:
            said = result.stderr.strip()[-STDERR_SHOWN:] or "(nothing on stderr)"
            raise SolverError(
                f"exec: {self.command[0]} {action} {fqdn} exited with {result.returncode}: {said}"
            )
