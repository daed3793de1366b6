"""A throwaway Spark standalone cluster on 127.0.0.1, for the fault tests and benchmarks/training.py: a Master and
Workers started with ``spark-class``, every process in its own session, waits bounded, and every process
killed (by the PIDs we started) on exit. Not part of the user API; it runs nothing at import."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pyspark

SPARK_CLASS = Path(pyspark.__file__).parent / "bin" / "spark-class"


__all__ = [
    "cluster_env",
    "descendants",
    "executor_pids",
    "free_port",
    "frozen",
    "kill_group",
    "standalone_cluster",
    "start_driver",
    "wait_port",
]


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


def kill_group(proc: subprocess.Popen[bytes]) -> None:
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
) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """Yield ``(master URL, procs)``; ``procs`` (master, workers, and whatever the caller appends) are
    killed in ``finally``."""
    env = cluster_env(tmp_path)
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
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


def start_driver(
    script: Path, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> tuple[subprocess.Popen[bytes], Callable[[], str]]:
    """Run the driver ``script`` (a process holds one SparkContext) in its own session and add it to
    ``procs`` so the cluster's ``finally`` kills it too; the process, and a function giving the last
    3,000 characters of its output. The output goes to ``tmp_path/driver.log``: a pipe read only at the
    end could fill, over a long job, and block the driver."""
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(
        [sys.executable, str(script)],
        env=cluster_env(tmp_path),
        start_new_session=True,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    procs.append(driver)
    return driver, lambda: log.read_text(errors="replace")[-3000:]


def wait_driving(
    driver: subprocess.Popen[bytes],
    tail: Callable[[], str],
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
) -> None:
    """Poll ``ready()`` until it holds: fail saying ``what`` did not happen after ``timeout`` seconds, or
    with the driver's output (``tail()``, from :func:`start_driver`) as soon as the driver has exited."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s"
        assert driver.poll() is None, tail()
        time.sleep(0.2)


def proc_table() -> dict[int, tuple[int, bytes, list[int]]]:
    """Every live process, read from Linux /proc: pid -> (parent pid, command line, [utime, stime,
    cutime, cstime] in clock ticks). Also benchmarks/inference.py's source of CPU seconds."""
    found: dict[int, tuple[int, bytes, list[int]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        found[int(entry.name)] = (int(fields[1]), cmdline, [int(f) for f in fields[11:15]])
    return found


def _processes() -> dict[int, tuple[int, bytes]]:
    """Every live process: pid -> (parent pid, command line)."""
    return {pid: (ppid, cmdline) for pid, (ppid, cmdline, _) in proc_table().items()}


def children(marker: bytes) -> list[int]:
    """PIDs of this process's live children whose command line holds ``marker``."""
    return [pid for pid, (ppid, cmdline) in _processes().items() if ppid == os.getpid() and marker in cmdline]


def executor_pids(worker: subprocess.Popen[bytes]) -> list[int]:
    """PIDs of the executor JVMs a standalone Worker we started has launched (its child processes)."""
    return [
        pid
        for pid, (ppid, cmdline) in _processes().items()
        if ppid == worker.pid and b"CoarseGrainedExecutorBackend" in cmdline
    ]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: a Worker's executor JVMs and their Python daemon and workers (which
    pyspark puts in a process group of their own, so ``killpg`` on the Worker misses them)."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in _processes().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextmanager
def frozen(proc: subprocess.Popen[bytes]) -> Iterator[list[int]]:
    """SIGSTOP ``proc`` and everything below it, as a host that stops answering; yield the stopped PIDs.

    On exit every one of them gets SIGCONT and SIGKILL: nothing we froze outlives the test.
    """
    pids = [proc.pid, *descendants(proc.pid)]
    try:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        yield pids
    finally:
        for pid in pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with suppress(ProcessLookupError):
                    os.kill(pid, sig)


def gpu_cluster_conf(tmp_path: Path, addresses: tuple[str, ...] = ("0", "1")) -> dict[str, str]:
    """Spark conf for ``local-cluster[1,N,1024]`` whose worker announces ``addresses`` as GPUs (a discovery
    script; no GPU needed), one per task."""
    discovery = tmp_path / "gpus.sh"
    found = ", ".join(f'"{a}"' for a in addresses)
    discovery.write_text(f'#!/bin/sh\necho \'{{"name": "gpu", "addresses": [{found}]}}\'\n')
    discovery.chmod(0o755)
    return {
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.worker.resource.gpu.amount": str(len(addresses)),
        "spark.worker.resource.gpu.discoveryScript": str(discovery),
        "spark.executor.resource.gpu.amount": str(len(addresses)),
        "spark.task.resource.gpu.amount": "1",
    }


def run_driver_script(source: str, tmp_path: Path, *, timeout: float = 300) -> None:
    """Run ``source`` as a driver program in its own Python process; fail with its output's tail."""
    script = tmp_path / "driver.py"
    script.write_text(source)
    proc = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"},
        capture_output=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        proc.stdout.decode(errors="replace")[-3000:] + proc.stderr.decode(errors="replace")[-3000:]
    )
