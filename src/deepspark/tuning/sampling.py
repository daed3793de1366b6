"""The built-in TPE sampler, and the same sampler run in a process of its own for large studies.

Optuna's TPE walks every finished trial in Python at each ask: about 4 ms per 1,000 trials in the
study on our 2-core VM (43 ms at 10,000 with a journal). In the driver that time holds the GIL, so the
coordinator's connection threads (tells, reports, hand-overs) queue behind it, and at 16 one-second
trials a second a 10,000-trial study saturates the driver. :class:`ProcessSampler` keeps the sampler's
decisions and moves its work: a child Python process opens the same journal, holds a TPE sampler built
by :func:`tpe_sampler` with the same seed, and answers Optuna's three sampling calls
(``infer_relative_search_space``, ``sample_relative``, ``sample_independent``) for the trial the
driver's ``study.ask()`` just created. The driver's thread waits on a pipe without the GIL, so the
coordinator may ask outside its lock (``Coordinator(parallel_asks=k)``); with ``processes=k`` > 1,
k trials are sampled at once, each on its own core.

The sampler sees what the in-process one sees: the same storage (trials, running ones included, which
TPE's constant liar counts as pending), and the same sequence of calls, so a study sampled this way
asks the same configurations as one sampled in the driver (a test holds it to that, trial by trial).
Messages are JSON lines (trial numbers, Optuna's JSON form of distributions, parameter values); no
pickle. The child exits when its input closes (the study's end, or the driver's death). When it fails
(an error, its death, or no reply within ``reply_timeout``: a hung child), the driver samples in process
from then on, with a warning: a sampler process never stops a study, nor hangs it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import optuna
from optuna.distributions import BaseDistribution, distribution_to_json, json_to_distribution

__all__ = ["PROCESS_FROM_TRIALS", "ProcessSampler", "sampler_processes", "tpe_sampler"]

_log = logging.getLogger(__name__)

#: A TPE study planned for this many trials or more samples in processes of its own. Measured with
#: ``benchmarks/hpo_scale.py`` (16 one-second trials at once, 2 cores): sampling in the driver gave
#: efficiency 0.972 / 0.980 / 0.986 / 0.919 at 1,000 / 2,000 / 5,000 / 10,000 trials, in processes
#: 0.955 / 0.975 / 0.986 / 0.989: below 5,000 the processes' start (~0.7 s under load) costs more
#: than they save; at 10,000 TPE's ask (~50 ms) saturates the driver.
PROCESS_FROM_TRIALS = 5000

#: At most this many sampler processes (each holds its own copy of the study's trials).
MAX_PROCESSES = 4

#: Seconds the child is given to exit after its input closes, before it is killed.
_EXIT_S = 5.0

#: Seconds a sampling call may wait for the child's reply by default. An ask takes ~50 ms at 10,000
#: trials; the first reply also waits for the child's start and its first read of the journal (seconds
#: for a large resumed study, on a loaded machine). Past it the child is taken for hung.
REPLY_TIMEOUT_S = 60.0

#: How often a wait for a reply also checks that the child is alive: a child that died while another
#: process holds its output pipe open never gives the wait an end of file.
_ALIVE_CHECK_S = 1.0


def tpe_sampler(*, seed: int | None, n_startup_trials: int) -> optuna.samplers.TPESampler:
    """The built-in ``tpe`` sampler: multivariate (parameters sampled jointly), and a constant liar so
    that running trials count as pending (trials run in parallel, and the coordinator samples ahead)."""
    return optuna.samplers.TPESampler(
        seed=seed, constant_liar=True, multivariate=True, n_startup_trials=n_startup_trials
    )


def sampler_processes() -> int:
    """How many sampler processes a large parallel study gets: one per driver core, at most
    :data:`MAX_PROCESSES` (the trials run on executors; the driver's cores are the sampler's)."""
    return max(1, min(MAX_PROCESSES, os.cpu_count() or 1))


class _Gone(Exception):
    """The sampler process cannot answer (it died, or was never started)."""


class ProcessSampler(optuna.samplers.BaseSampler):
    """:func:`tpe_sampler` run in ``processes`` child processes over the journal file at ``journal``.

    Each trial is sampled by one child (trial number modulo ``processes``), so asks for different
    trials run at once, each on its own core: Optuna's own way of sampling one study from several
    processes (each with its own sampler, seeded ``seed + i``, over the shared storage). With one
    process the study asks exactly what the driver's sampler would. A child that does not reply
    within ``reply_timeout`` seconds is taken for hung: it is killed, and the driver samples instead.

    Safe to call from several threads (calls to one child are serialised; a waiting thread holds no
    GIL). Children start at :meth:`start` or at their first sampling call (constructing this is free
    of side effects); :meth:`close` ends them, and must be called when the study is done.
    """

    def __init__(
        self,
        *,
        journal: str,
        study_name: str,
        seed: int | None,
        n_startup_trials: int,
        processes: int = 1,
        reply_timeout: float = REPLY_TIMEOUT_S,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        if not reply_timeout > 0:
            raise ValueError(f"reply_timeout must be > 0 seconds, got {reply_timeout}")
        self._children = [
            _Child(
                {
                    "journal": journal,
                    "study_name": study_name,
                    "seed": None if seed is None else seed + i,
                    "n_startup_trials": n_startup_trials,
                },
                reply_timeout=reply_timeout,
            )
            for i in range(processes)
        ]
        self._local = tpe_sampler(seed=seed, n_startup_trials=n_startup_trials)
        self._failed = threading.Event()

    @property
    def processes(self) -> int:
        return len(self._children)

    # -------------------------------------------------------------------------- Optuna's calls
    def infer_relative_search_space(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial
    ) -> dict[str, BaseDistribution]:
        try:
            space = self._call({"op": "space", "trial": trial.number})
        except _Gone:
            return self._local.infer_relative_search_space(study, trial)
        return {name: json_to_distribution(text) for name, text in space.items()}

    def sample_relative(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        message = {"op": "relative", "trial": trial.number, "space": _space_json(search_space)}
        try:
            return dict(self._call(message))
        except _Gone:
            return self._local.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        message = {
            "op": "independent",
            "trial": trial.number,
            "name": param_name,
            "distribution": distribution_to_json(param_distribution),
        }
        try:
            return self._call(message)
        except _Gone:
            return self._local.sample_independent(study, trial, param_name, param_distribution)

    # -------------------------------------------------------------------------- the children
    @property
    def running(self) -> int:
        """How many sampler processes are up (for tests and diagnostics)."""
        return sum(child.running for child in self._children)

    def start(self) -> None:
        """Start the children now, without waiting for them: their imports (~0.2 s) then overlap the
        Spark job's start instead of delaying the first trials."""
        for child in self._children:
            child.start()

    def close(self) -> None:
        """End the children (each exits when its input closes; killed if it has not within seconds)."""
        for child in self._children:
            child.close()

    def _call(self, message: Mapping[str, Any]) -> Any:
        if self._failed.is_set():
            raise _Gone
        child = self._children[int(message["trial"]) % len(self._children)]
        try:
            return child.call(message)
        except _Gone:
            if not self._failed.is_set():
                self._failed.set()
                self.close()  # one sampler for the rest of the study: the driver's
            raise


class _Child:
    """One sampler process: JSON lines in, one JSON reply per line out."""

    def __init__(self, spec: Mapping[str, Any], *, reply_timeout: float) -> None:
        self._spec = dict(spec)
        self._reply_timeout = reply_timeout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False

    @property
    def running(self) -> bool:
        with self._lock:
            return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        with self._lock:
            if self._closed or self._proc is not None:
                return
            try:
                self._start()
            except OSError as exc:
                self._fail(exc)  # the first call then finds it gone, and the driver samples

    def call(self, message: Mapping[str, Any]) -> Any:
        with self._lock:
            if self._closed:
                raise _Gone
            try:
                proc = self._proc if self._proc is not None else self._start()
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(json.dumps(message).encode("utf-8") + b"\n")
                proc.stdin.flush()
                reply = json.loads(self._reply(proc))
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                return reply["result"]
            except (OSError, ValueError, EOFError, RuntimeError, subprocess.TimeoutExpired) as exc:
                self._fail(exc)
                raise _Gone from exc

    def _reply(self, proc: subprocess.Popen[bytes]) -> bytes:
        """Under the lock: the child's reply line, waited for at most ``reply_timeout`` seconds.

        Read from the pipe's descriptor, not through a buffered reader, so that ``select`` sees every
        byte not yet read (one reply per request: nothing is left over for the next call).
        """
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + self._reply_timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the sampler process gave no reply within {self._reply_timeout:g} s")
            readable, _, _ = select.select([fd], [], [], min(left, _ALIVE_CHECK_S))
            if not readable:
                if proc.poll() is not None:
                    raise EOFError(f"the sampler process exited (code {proc.returncode})")
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"the sampler process exited (code {proc.wait(_EXIT_S)})")
            line += chunk
        return line

    def _fail(self, exc: BaseException) -> None:
        """Under the lock: this child is done for; the driver samples instead."""
        self._closed = True
        _log.warning("the sampler process failed (%s); sampling in the driver from now on", exc)
        self._end(kill=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._end(kill=False)

    def _start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deepspark.tuning.sampling"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_child_env(),
        )
        self._proc = proc
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(self._spec).encode("utf-8") + b"\n")
        proc.stdin.flush()
        return proc

    def _end(self, *, kill: bool) -> None:
        """Under the lock: close the child's input (it exits on its own), or kill it; then reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(_EXIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_EXIT_S)
        if proc.stdout is not None:
            proc.stdout.close()


def _child_env() -> dict[str, str]:
    """The driver's environment, with deepspark's own directory first on the path (the driver may have
    it from ``sys.path`` edits or a working directory that the child does not share)."""
    root = str(Path(__file__).resolve().parents[2])
    path = [root, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def _space_json(space: Mapping[str, BaseDistribution]) -> dict[str, str]:
    return {name: distribution_to_json(d) for name, d in space.items()}


def _plain(value: Any) -> Any:
    """numpy scalars as Python ones, for JSON."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _serve(spec: Mapping[str, Any], requests: IO[str], replies: IO[str]) -> None:
    """The child's loop: one JSON reply per request line, until the input closes."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = tpe_sampler(seed=spec["seed"], n_startup_trials=int(spec["n_startup_trials"]))
    storage = JournalStorage(JournalFileBackend(str(spec["journal"])))
    study: optuna.Study | None = None
    number = -1
    for line in requests:
        try:
            msg = json.loads(line)
            if study is None or int(msg["trial"]) != number:
                # A new Study object per trial: the study's view of its trials is then read afresh for
                # each trial and shared by that trial's calls, as within the driver's study.ask().
                number = int(msg["trial"])
                study = optuna.load_study(
                    study_name=str(spec["study_name"]), storage=storage, sampler=sampler
                )
            trial = _frozen(study, number)
            op = msg["op"]
            result: Any
            if op == "space":
                result = _space_json(sampler.infer_relative_search_space(study, trial))
            elif op == "relative":
                space = {name: json_to_distribution(text) for name, text in msg["space"].items()}
                result = sampler.sample_relative(study, trial, space)
            elif op == "independent":
                distribution = json_to_distribution(msg["distribution"])
                result = sampler.sample_independent(study, trial, str(msg["name"]), distribution)
            else:
                raise ValueError(f"unknown op {op!r}")
            reply = json.dumps({"result": result}, default=_plain)
        except Exception as exc:  # reported to the driver, which then samples itself
            reply = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
        replies.write(reply + "\n")
        replies.flush()


def _frozen(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    if number < len(trials) and trials[number].number == number:
        return trials[number]
    for trial in trials:
        if trial.number == number:
            return trial
    raise KeyError(f"no trial {number} in the study")


def main() -> int:
    # Replies go to the original stdout; anything else that prints (a library) goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        spec = json.loads(sys.stdin.readline() or "null")
    except ValueError:
        spec = None
    if not isinstance(spec, dict):
        print("deepspark sampler process: expected the study's spec as one JSON line", file=sys.stderr)
        return 2
    try:
        _serve(spec, sys.stdin, replies)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the study could not be opened: the driver samples itself
        print(f"deepspark sampler process: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
