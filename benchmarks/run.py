"""The one command: ``python -m benchmarks.run [--quick] [--peers ...] [--target URL]``.

Starts a native upstream and each contender pinned to its own core, drives every workload
with wrk (h2load for HTTP/2), alternating the contenders, measures the proxy's CPU and memory
from /proc, and writes results.json, results.md and plots. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks import contenders as cont
from benchmarks import tools
from benchmarks.certs import make_certificates
from benchmarks.idle import idle_memory
from benchmarks.load import (
    BY_KEY,
    H2_CLIENTS,
    H2_STREAMS,
    H2LoadResult,
    NoH2,
    Workload,
    WrkResult,
    add_cpu,
    lua_script,
    metrics,
    run_h2load,
    run_wrk,
)
from benchmarks.procs import PeakRSS, Processes, cores, cpu_seconds, free_port
from benchmarks.report import console_report, summarize, write_outputs

RESULTS = Path(__file__).resolve().parent / "results"
EXIT_UNAVAILABLE = 3  # a tool the suite cannot run without (wrk, nginx) could not be had
Usable = tuple[Workload, Path | None, Path | None]  # workload, wrk script, LD_PRELOAD shim


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; --quick changes the defaults to a CI-sized run of ours alone."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="ours only, ~1 s per workload (CI)")
    parser.add_argument("--peers", default=",".join(cont.PEERS), help="comma list, or 'none'")
    parser.add_argument("--workloads", default=",".join(BY_KEY), help="comma list of workloads")
    parser.add_argument("--duration", type=int, help="seconds per run (default 10; quick 1)")
    parser.add_argument("--repeat", type=int, help="runs per contender (default 3; quick 1)")
    parser.add_argument("--connections", type=int, default=64, help="wrk -c (default 64)")
    parser.add_argument("--idle-connections", type=int, help="default 5000; quick 200; 0 = skip")
    parser.add_argument("--target", metavar="URL", help="load-test a running deployment")
    parser.add_argument("--target-pid", type=int, help="with --target: its pid, for CPU/RSS")
    parser.add_argument("--out", type=Path, help="results directory")
    parser.add_argument("--no-install", action="store_true", help="never apt-get/pip install")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only re-write tables and plots from a JSON"
    )
    args = parser.parse_args(argv)
    quick, mode = args.quick, "target" if args.target else "quick" if args.quick else "full"
    args.mode = mode
    args.duration = args.duration or (1 if quick else 10)
    args.repeat = args.repeat or (1 if quick else 3)
    if args.idle_connections is None:
        args.idle_connections = 200 if quick else 5000
    if args.out is None:
        args.out = RESULTS if mode == "full" else RESULTS / "tmp" / mode
    peers = [] if quick or args.peers == "none" else args.peers.split(",")
    unknown = [name for name in peers if name not in cont.PEERS]
    unknown += [key for key in args.workloads.split(",") if key not in BY_KEY]
    if unknown:
        parser.error(f"unknown peer or workload: {', '.join(unknown)}")
    args.contenders = [cont.OURS, *peers]
    args.workload_list = [BY_KEY[key] for key in args.workloads.split(",")]
    if args.target and any(w.method != "GET" or w.path != "/" for w in args.workload_list):
        if args.workloads != ",".join(BY_KEY):
            parser.error("--target runs GET workloads only: keepalive, close, handshake, h2")
        args.workload_list = [BY_KEY["keepalive"]]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; every process it started is gone when this returns."""
    args = parse_args(argv)
    if args.render:
        return render(args.render)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    nofile = _raise_fd_limit()
    proxy_core, load_core = cores()
    if load_core is not None:
        os.sched_setaffinity(0, {load_core})  # keep our own sampling off the proxy's core
    installer = tools.Installer(allowed=not args.no_install)
    if installer.find("wrk") is None:
        print("benchmarks: wrk is needed (apt-get install wrk)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    scratch = Path(tempfile.mkdtemp(prefix="tlsproxy-bench-"))
    try:
        with Processes(scratch) as procs:
            suite = Suite(args, procs, scratch, installer, nofile, (proxy_core, load_core))
            result = suite.run_target() if args.target else suite.run()
    except cont.Unavailable as error:
        print(f"benchmarks: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except RuntimeError as error:  # wrk could not reach --target, and the like
        print(f"benchmarks: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmarks: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"scratch directory kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(console_report(result))
    for path in write_outputs(result, args.out):
        print(f"wrote {path}")
    return 0


def render(path: Path) -> int:
    """Re-make results.md and the plots beside an existing results.json (no measuring)."""
    result = json.loads(path.read_text())
    print(console_report(result))
    for written in write_outputs(result, path.parent):
        print(f"wrote {written}")
    return 0


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C does, so every ``finally`` stops its processes."""
    raise SystemExit(128 + signum)


def _raise_fd_limit() -> int:
    """Soft open-files limit up to the hard one (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 65536)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Suite:
    """One benchmark session: the processes, the measurements, the result document."""

    def __init__(
        self,
        args: argparse.Namespace,
        procs: Processes,
        scratch: Path,
        installer: tools.Installer,
        nofile: int,
        cores: tuple[int | None, int | None],
    ) -> None:
        self.args = args
        self.procs = procs
        self.scratch = scratch
        self.installer = installer
        self.nofile = nofile
        self.proxy_core, self.load_core = cores
        self.notes: list[str] = []
        self.runs: list[dict[str, Any]] = []
        self.running: dict[str, cont.Running] = {}
        self.result = self._document()

    def _document(self) -> dict[str, Any]:
        """The skeleton of results.json: how the numbers were made and where."""
        args = self.args
        return {
            "schema": 1,
            "mode": args.mode,
            "command": shlex.join(["python", "-m", "benchmarks.run", *sys.argv[1:]]),
            "started": _now(),
            "settings": {
                "duration": args.duration,
                "repeat": args.repeat,
                "connections": args.connections,
                "wrk_threads": 1,
                "h2_connections": H2_CLIENTS,
                "h2_streams": H2_STREAMS,
                "idle_connections": args.idle_connections,
                "proxy_core": self.proxy_core,
                "load_core": self.load_core,
                "workloads": [w.key for w in args.workload_list],
            },
            "machine": tools.machine(),
            "contenders": {},
            "skipped": {},
            "runs": self.runs,
            "summary": {},
            "idle": {},
            "idle_h2": {},
            "no_h2": {},
            "notes": self.notes,
        }

    # --- the full and quick modes -------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Start everything, measure every workload for every contender, then idle memory."""
        setup = self._setup()
        self._start_upstream(setup)
        for name in self.args.contenders:
            self._start_contender(name, setup)
        workloads = self._usable_workloads()
        self._warm_up(workloads)
        self._measure_all(workloads)
        if self.args.idle_connections > 0:
            self._measure_idle(setup)
        return self._finish()

    def _setup(self) -> cont.Setup:
        """Certificates, a snapshot of the proxy's code, and the upstream's port."""
        certs = make_certificates(self.scratch)
        return cont.Setup(
            directory=self.scratch,
            certs=certs,
            upstream_port=free_port(),
            nofile=self.nofile,
            installer=self.installer,
            proxy_root=cont.snapshot(self.scratch),
        )

    def _start_upstream(self, setup: cont.Setup) -> None:
        """nginx as the upstream, on the load core (its work is not the proxy's)."""
        launch = cont.upstream_launch(setup)
        cont.start(self.procs, launch, self.load_core, ca=None)
        self.result["machine"]["upstream"] = launch.version

    def _start_contender(self, name: str, setup: cont.Setup) -> None:
        """Start one contender on the proxy core; a peer that cannot run is skipped."""
        try:
            launch = cont.LAUNCHERS[name](setup)
            running = cont.start(self.procs, launch, self.proxy_core, setup.certs.ca)
        except cont.Unavailable as error:
            if name == cont.OURS:
                raise
            reason = str(error).splitlines()[0]
            self.result["skipped"][name] = reason
            self.notes.append(f"{name} skipped: {reason}")
            print(f"skipping {name}: {error}", flush=True)
            return
        self.running[name] = running
        self.result["contenders"][name] = {
            "version": launch.version,
            "command": shlex.join(launch.argv),
            "tls": running.tls,
            "alpn": running.alpn,
        }
        if running.no_h2 and self._wants_h2:
            self.result["no_h2"][name] = running.no_h2
        print(
            f"started {launch.version} on 127.0.0.1:{launch.port} ({running.tls}; "
            f"offered h2, http/1.1: {running.no_h2 or 'h2'})",
            flush=True,
        )

    @property
    def _wants_h2(self) -> bool:
        return any(workload.h2 for workload in self.args.workload_list)

    def _usable_workloads(self) -> list[Usable]:
        """Each workload with its wrk script and, for full handshakes, the shim to preload;
        HTTP/2 needs h2load and a contender that negotiates h2 (in --quick: ours)."""
        usable: list[Usable] = []
        for workload in self.args.workload_list:
            if workload.h2:
                if self._h2_usable():
                    usable.append((workload, None, None))
                continue
            preload = None
            if workload.full_handshake:
                preload = tools.nosession_shim(self.installer)
                if preload is None:
                    self.notes.append(
                        f"{workload.key} skipped: no C compiler to build benchmarks/nosession.c"
                    )
                    continue
            usable.append((workload, lua_script(workload, self.scratch), preload))
        return usable

    def _h2_usable(self) -> bool:
        """Whether the h2 workload can run: some contender speaks h2, and h2load is here."""
        if not any(running.h2 for running in self.running.values()):
            why = "; ".join(f"{name}: {r.no_h2}" for name, r in self.running.items())
            self.notes.append(f"h2 skipped: no contender negotiates h2 ({why})")
            return False
        if self.installer.find("h2load") is None:
            self.notes.append("h2 skipped: h2load is not installed (Debian package nghttp2-client)")
            return False
        return True

    def _warm_up(self, workloads: list[Usable]) -> None:
        """A short keep-alive run per contender (and h2 run, when h2 is measured): pools,
        caches and allocators filled."""
        script = lua_script(BY_KEY["keepalive"], self.scratch)
        duration = 1 if self.args.quick else 2
        h2 = any(workload.h2 for workload, _script, _preload in workloads)
        for running in self.running.values():
            run_wrk(
                self._url(running),
                script,
                duration=duration,
                connections=self.args.connections,
                core=self.load_core,
            )
            if h2 and running.h2:
                with contextlib.suppress(RuntimeError, OSError):
                    self._h2load(running, duration)

    def _h2load(self, running: cont.Running, duration: int) -> H2LoadResult:
        return run_h2load(
            self._url(running),
            duration=duration,
            core=self.load_core,
            log=self.scratch / "h2load.log",
        )

    def _url(self, running: cont.Running, path: str = "/") -> str:
        return f"https://localhost:{running.launch.port}{path}"

    def _measure_all(self, workloads: list[Usable]) -> None:
        """Repeat x workload x contender, contenders alternating (A B A B) so drift in the
        machine's load spreads over all of them instead of favouring one."""
        per_repeat = sum(
            1 for w, _s, _p in workloads for r in self.running.values() if r.h2 or not w.h2
        )
        total = self.args.repeat * per_repeat
        print(f"{total} runs of {self.args.duration} s ...", flush=True)
        for repeat in range(1, self.args.repeat + 1):
            for workload, script, preload in workloads:
                for name, running in list(self.running.items()):
                    self._measure_one(repeat, workload, script, preload, name, running)

    def _measure_one(
        self,
        repeat: int,
        workload: Workload,
        script: Path | None,
        preload: Path | None,
        name: str,
        running: cont.Running,
    ) -> None:
        """One wrk (or h2load) run against one contender, with the proxy's CPU time and peak
        RSS; a contender that does not negotiate h2 is not measured with the h2 workload."""
        if running.started.process.poll() is not None:
            return
        if workload.h2 and not running.h2:
            return
        before = cpu_seconds(running.pid)
        result: WrkResult
        with PeakRSS(running.pid) as rss:
            try:
                if workload.h2:
                    result = self._h2load(running, self.args.duration)
                else:
                    assert script is not None
                    result = run_wrk(
                        self._url(running, workload.path),
                        script,
                        duration=self.args.duration,
                        connections=self.args.connections,
                        core=self.load_core,
                        preload=preload,
                    )
            except NoH2 as error:  # ALPN picked h2 for our probe, yet not for h2load
                running.no_h2 = str(error)
                self.result["no_h2"][name] = str(error)
                self.notes.append(f"{name} {workload.key} repeat {repeat}: h2load got {error}")
                print(f"  {workload.key:9} {name:10} {error}", flush=True)
                return
            except (RuntimeError, OSError) as error:
                self.notes.append(f"{name} {workload.key} repeat {repeat}: {error}")
                print(f"  {workload.key:9} {name:10} failed: {error}", flush=True)
                self._check_alive(name, running)
                return
        values = metrics(result, workload)
        add_cpu(values, cpu_seconds(running.pid) - before, rss.peak)
        run: dict[str, Any] = {
            "contender": name,
            "workload": workload.key,
            "repeat": repeat,
            "loadavg_1m": os.getloadavg()[0],
            "metrics": values,
        }
        if isinstance(result, H2LoadResult):
            run["protocol"], run["tls"] = result.protocol, result.tls
        self.runs.append(run)
        print(
            f"  [{repeat}/{self.args.repeat}] {workload.key:9} {name:10} "
            f"{values['rps']:9,.0f} req/s  p99 {values['p99_ms']:7.2f} ms  "
            f"CPU {values['cpu_s']:5.2f} s  errors {values['errors']:.0f}",
            flush=True,
        )
        self._check_alive(name, running)
        time.sleep(0.2 if self.args.quick else 1.0)  # let closing connections drain

    def _check_alive(self, name: str, running: cont.Running) -> None:
        """A contender that died is reported, with the end of its log, and left out."""
        if running.started.process.poll() is None:
            return
        code = running.started.process.returncode
        self.notes.append(f"{name} exited with status {code} during the run")
        print(f"{name} exited ({code}):\n{running.started.log_tail()}", flush=True)
        del self.running[name]

    def _measure_idle(self, setup: cont.Setup) -> None:
        """RSS growth per idle TLS connection, each contender in turn, each restarted first:
        memory a process freed after the 1 MiB runs would otherwise hide the growth. With
        the h2 workload selected, the same again over HTTP/2 for each contender speaking h2."""
        count = self.args.idle_connections
        for name in list(self.running):
            kinds = [("idle", False)]
            if self._wants_h2 and self.running[name].h2:
                kinds.append(("idle_h2", True))
            for key, http2 in kinds:
                running = self._restart(name, setup)
                values = idle_memory(
                    running.pid, running.launch.port, count, setup.certs.ca, http2=http2
                )
                self.result[key][name] = values
                print(
                    f"  {key:9} {name:10} {values['opened']:.0f} connections, "
                    f"{values['kib_per_conn']:.1f} KiB each",
                    flush=True,
                )
                if values["opened"] < count:
                    self.notes.append(
                        f"{name}: only {values['opened']:.0f} of {count} {key} connections opened"
                    )

    def _restart(self, name: str, setup: cont.Setup) -> cont.Running:
        """Stop a contender and start it again on the same port, warmed up briefly."""
        old = self.running[name]
        self.procs.stop(old.started)
        running = cont.start(self.procs, old.launch, self.proxy_core, setup.certs.ca)
        self.running[name] = running
        script = lua_script(BY_KEY["keepalive"], self.scratch)
        run_wrk(self._url(running), script, duration=1, connections=16, core=self.load_core)
        return running

    def _finish(self) -> dict[str, Any]:
        """Medians, the machine's load at the end, and the standing caveats."""
        self.result["summary"] = summarize(self.runs)
        self.result["finished"] = _now()
        self.result["machine"]["loadavg_end"] = list(os.getloadavg())
        self.notes.append(
            "absolute numbers move by about ±30% between runs on shared machines: compare the "
            "ratios within one run"
        )
        if self.proxy_core is None:
            self.notes.append("fewer than 2 cores: nothing was pinned, numbers mix proxy and load")
        errors = [r for r in self.runs if r["metrics"]["errors"] > 0.01 * r["metrics"]["requests"]]
        for run in errors:
            self.notes.append(
                f"{run['contender']} {run['workload']} repeat {run['repeat']}: "
                f"{run['metrics']['errors']:.0f} wrk errors (over 1% of requests)"
            )
        return self.result

    # --- --target ------------------------------------------------------------------------

    def run_target(self) -> dict[str, Any]:
        """wrk against a running deployment; with --target-pid its CPU and RSS as well."""
        url = self.args.target
        name = "target"
        self.result["contenders"][name] = {"version": url, "command": "", "tls": ""}
        self.result["settings"]["target"] = url
        for workload in self.args.workload_list:
            if workload.h2 and self.installer.find("h2load") is None:
                raise RuntimeError("h2load is needed for h2 (apt-get install nghttp2-client)")
            preload = tools.nosession_shim(self.installer) if workload.full_handshake else None
            script = lua_script(workload, self.scratch)
            pid = self.args.target_pid
            before = cpu_seconds(pid) if pid else 0.0
            sampler = PeakRSS(pid) if pid else None
            with sampler or contextlib.nullcontext():
                if workload.h2:  # NoH2 (a RuntimeError) when the target does not pick h2
                    result: WrkResult = run_h2load(
                        url,
                        duration=self.args.duration,
                        core=None,
                        log=self.scratch / "h2load.log",
                    )
                else:
                    result = run_wrk(
                        url,
                        script,
                        duration=self.args.duration,
                        connections=self.args.connections,
                        core=None,
                        preload=preload,
                    )
            values = metrics(result, workload)
            if pid and sampler:
                add_cpu(values, cpu_seconds(pid) - before, sampler.peak)
            self.runs.append(
                {"contender": name, "workload": workload.key, "repeat": 1, "metrics": values}
            )
        if not self.args.target_pid:
            self.notes.append("no --target-pid: CPU and memory columns are not measured")
        self.result["summary"] = summarize(self.runs)
        self.result["finished"] = _now()
        self.result["machine"]["loadavg_end"] = list(os.getloadavg())
        return self.result


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


if __name__ == "__main__":
    sys.exit(main())
