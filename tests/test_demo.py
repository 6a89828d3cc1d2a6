"""The README's first command: examples/demo.py prints a curl line, and that line works."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import ROOT, free_port


def test_the_printed_curl_line_reaches_the_example_app(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TLSPROXY_DEMO_HTTPS_PORT": str(free_port()),
        "TLSPROXY_DEMO_HTTP_PORT": str(free_port()),
        "TLSPROXY_DEMO_APP_PORT": str(free_port()),
        "TLSPROXY_DEMO_STORAGE": str(tmp_path / "data"),
        "PYTHONUNBUFFERED": "1",
    }
    demo = subprocess.Popen(
        [sys.executable, "examples/demo.py"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            if line.startswith("try:") or not line:
                break
        assert line.startswith("try:  curl --cacert "), line
        command = shlex.split(line.removeprefix("try:"))
        answer = ""
        for _ in range(50):  # the app under uvicorn may still be starting
            result = subprocess.run(
                [*command, "-sS", "--max-time", "10"], capture_output=True, text=True, timeout=20
            )
            if result.returncode == 0 and result.stdout.startswith("{"):
                answer = result.stdout
                break
            time.sleep(0.2)
        seen = json.loads(answer)
        assert seen["scheme"] == "https"
        assert seen["client"] == "127.0.0.1"
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(15)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
        if demo.stdout is not None:
            demo.stdout.close()
    assert demo.returncode == 0
