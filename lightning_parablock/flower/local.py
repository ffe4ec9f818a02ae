"""A Flower deployment on this machine: a SuperLink, SuperNodes and ``flwr run``, for the demo, tests and benchmark.

Everything listens on 127.0.0.1 without TLS (``--insecure``: fine on one machine, never across a network; the
README shows the coordinator with TLS and node authentication). Flower's state lives in a folder of its own
(``FLWR_HOME``), telemetry and update checks are off, and every process started here, with every process it
started (the SuperLink's SuperExec, a SuperNode's ClientApps), is ended by :meth:`LocalFlower.stop`.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

APP_DIR = Path(__file__).parent / "app"
"""The Flower App folder ``flwr run`` bundles (its pyproject.toml names the ServerApp and the ClientApp)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_config_text(values: Mapping[str, Any]) -> str:
    """``--run-config``'s ``key=value`` list (TOML values: strings quoted)."""

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return str(item).lower()
        if isinstance(item, (int, float)):
            return repr(item)
        return "'" + str(item).replace("'", "") + "'"

    return " ".join(f"{key}={value(item)}" for key, item in values.items())


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc), children first found first."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def end_process_tree(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM ``process`` and everything it started, SIGKILL whatever is left after ``grace_s``."""
    pids = [process.pid, *descendants(process.pid)] if process.poll() is None else descendants(process.pid)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids + descendants(process.pid):
        _signal(pid, signal.SIGKILL)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


class LocalFlower:
    """A SuperLink and SuperNodes on 127.0.0.1, their logs and state in ``folder``.

    Args:
        folder: Flower's home (``FLWR_HOME``) and the processes' log files go here.
        log: where progress lines go.
    """

    def __init__(self, folder: Path, log: Callable[[str], None] = print) -> None:
        self.folder = Path(folder)
        self.log = log
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []
        self.folder.mkdir(parents=True, exist_ok=True)
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),  # the SuperLink starts flower-superexec by name
            "FLWR_HOME": str(self.folder / "flwr_home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
        }
        (self.folder / "flwr_home").mkdir(exist_ok=True)
        (self.folder / "flwr_home" / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def start(self, name: str, command: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``command`` in a session of its own, its output in ``NAME.log``; :meth:`stop` ends it."""
        log_file = open(self.folder / f"{name}.log", "ab")
        process = subprocess.Popen(
            command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )
        log_file.close()
        self.processes.append(process)
        return process

    def start_superlink(self, timeout_s: float = 120.0) -> None:
        """The SuperLink, insecure, on 127.0.0.1; returns once its port answers."""
        self.start(
            "superlink",
            ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
             "--disable-runtime-dependency-installation"],
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    self.log(f"SuperLink on 127.0.0.1:{self.port} (insecure: this machine only)")
                    return
            if self.processes[-1].poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"the SuperLink did not start; see {self.folder / 'superlink.log'}")

    def start_supernode(self, name: str, node_config: Mapping[str, str]) -> subprocess.Popen:
        """A SuperNode of the local SuperLink whose ClientApps reach a site through ``node_config``."""
        config = " ".join(f'{key}="{value}"' for key, value in node_config.items())
        return self.start(
            name,
            ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
             "--node-config", config],
        )  # fmt: skip

    def run_app(self, run_config: Mapping[str, Any]) -> subprocess.Popen:
        """``flwr run`` of the parablock app on the local SuperLink, streaming the server's log to a pipe (text) the
        caller reads."""
        command = ["flwr", "run", str(APP_DIR), "local", "--stream", "--run-config", run_config_text(run_config)]
        self.log("$ " + shlex.join(command))
        process = subprocess.Popen(
            command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """End every process started here, with their children (newest first)."""
        for process in reversed(self.processes):
            end_process_tree(process)
        self.processes.clear()

    def __enter__(self) -> "LocalFlower":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
