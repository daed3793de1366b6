"""A real Spark standalone cluster on 127.0.0.1 for fault tests: a Master and Workers started with
``spark-class``, every process in its own session and killed (by the PIDs we started) on exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyspark

SPARK_CLASS = Path(pyspark.__file__).parent / "bin" / "spark-class"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def cluster_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_WORKER_DIR": str(tmp_path / "work"),
        "SPARK_LOG_DIR": str(tmp_path / "logs"),
        "PYSPARK_PYTHON": sys.executable,
    }


@contextmanager
def standalone_cluster(
    tmp_path: Path, *, workers: int = 1, cores: int = 2, memory: str = "2g"
) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """Yield ``(master URL, procs)``; ``procs`` (master, workers, and whatever the caller appends) are
    killed in ``finally``."""
    env = cluster_env(tmp_path)
    port = free_port()
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [str(SPARK_CLASS), *args],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        return proc

    try:
        start(
            "org.apache.spark.deploy.master.Master",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--webui-port",
            str(free_port()),
        )
        wait_port(port, 60)
        for i in range(workers):
            start(
                "org.apache.spark.deploy.worker.Worker",
                f"spark://127.0.0.1:{port}",
                "--host",
                "127.0.0.1",
                "--cores",
                str(cores),
                "--memory",
                memory,
                "--webui-port",
                str(free_port()),
                "--work-dir",
                str(tmp_path / f"work{i}"),
            )
        yield f"spark://127.0.0.1:{port}", procs
    finally:
        for proc in reversed(procs):
            kill_group(proc)


def executor_pids(worker: subprocess.Popen) -> list[int]:
    """PIDs of the executor JVMs a standalone Worker we started has launched (its child processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == worker.pid and b"CoarseGrainedExecutorBackend" in cmdline:
            pids.append(int(entry.name))
    return pids
