"""Finding or starting a SparkSession, and matching threads to Spark task slots.

deepspark never manages a cluster. It uses the running SparkSession when there is one, otherwise it
builds one from ordinary Spark configuration (``--master``, ``--conf spark.master=...``, ``spark.master``
in ``spark-defaults.conf``, ``MASTER``), defaulting to the embedded ``local[*]`` only when none of
them names a master.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from deepspark.errors import ConfigError
from deepspark.validation import check_positive_int, fail

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

_T = TypeVar("_T")

__all__ = [
    "DEVICES",
    "assigned_gpus",
    "cancel_group",
    "check_gpu_request",
    "check_master",
    "check_master_form",
    "check_task_cpus",
    "column",
    "configured",
    "device_label",
    "end_lost_jvms",
    "environment_conf",
    "executor_cores",
    "freeze_worker_objects",
    "job_group",
    "job_result",
    "limit_threads",
    "master_cores",
    "quiet_log_options",
    "release_broadcast",
    "run_job",
    "running_session",
    "session",
    "speculative_copy",
    "task_cpus",
    "task_device",
    "task_memory",
    "thaw_worker_objects",
    "total_cores",
    "total_slots",
]

_log = logging.getLogger(__name__)

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_PROBE_S = 5.0  # a standalone master that does not accept a TCP connection in this time is taken as down
_JAVA_OPTIONS = "spark.driver.extraJavaOptions"
_VERBOSE_SPARK_LEVELS = {"ALL", "TRACE", "DEBUG", "INFO"}


@dataclass(frozen=True)
class _Settings:
    conf: Mapping[str, str] = field(default_factory=dict)
    quiet_start: bool = True


_SETTINGS: contextvars.ContextVar[_Settings | None] = contextvars.ContextVar("deepspark_spark", default=None)


@contextlib.contextmanager
def configured(conf: Mapping[str, Any] | None = None, *, quiet_start: bool = True) -> Iterator[None]:
    """Within the block, a session deepspark starts gets ``conf`` (it wins over deepspark's own settings,
    such as ``spark.task.cpus`` from ``threads_per_trial``) and, unless ``quiet_start`` is false, the quiet
    log4j2 configuration. This is how the command line's ``--conf key=value`` and ``-v`` reach the session
    that ``tune``, ``fit`` and ``predict`` start, without a Spark parameter on each of them.
    """
    token = _SETTINGS.set(_Settings({k: str(v) for k, v in (conf or {}).items()}, quiet_start))
    try:
        yield
    finally:
        _SETTINGS.reset(token)


def _conf_dir(env: Mapping[str, str]) -> Path | None:
    if env.get("SPARK_CONF_DIR"):
        return Path(env["SPARK_CONF_DIR"])
    if env.get("SPARK_HOME"):
        return Path(env["SPARK_HOME"]) / "conf"
    return None


def environment_conf(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The properties of ``spark-defaults.conf`` in ``$SPARK_CONF_DIR`` (else ``$SPARK_HOME/conf``).

    spark-submit (which pyspark runs to start the driver JVM) applies this file itself; we read it only
    to know whether it names a master, so that ``local[*]`` never overrides the cluster's own choice.
    """
    directory = _conf_dir(os.environ if env is None else env)
    path = directory / "spark-defaults.conf" if directory is not None else None
    if path is None or not path.is_file():
        return {}
    props: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        # Java properties syntax, as Spark reads it: key and value split by whitespace, '=' or ':'.
        key, value = line, ""
        for i, ch in enumerate(line):
            if ch.isspace() or ch in "=:":
                key, value = line[:i], line[i + 1 :].strip()
                if ch.isspace() and value[:1] in ("=", ":"):
                    value = value[1:].strip()
                break
        props[key] = value
    return props


def _log4j_configured(options: str, env: Mapping[str, str]) -> bool:
    if "log4j2.configurationFile" in options or "log4j.configurationFile" in options:
        return True
    directory = _conf_dir(env)
    return directory is not None and any(
        (directory / name).is_file() for name in ("log4j2.properties", "log4j2.xml", "log4j2.yaml")
    )


def quiet_log_options(conf: Mapping[str, str], env: Mapping[str, str] | None = None) -> str | None:
    """The ``spark.driver.extraJavaOptions`` that make the driver JVM start quietly, or None to leave it.

    Our ``log4j2.properties`` goes first, followed by the options the user's conf or spark-defaults.conf
    already had (a value given here replaces the file's, so we keep both). A user's own log4j2
    configuration, or ``DEEPSPARK_SPARK_LOG_LEVEL`` at INFO or more verbose, leaves Spark's logging as it is.
    """
    env = os.environ if env is None else env
    if env.get("DEEPSPARK_SPARK_LOG_LEVEL", "").upper() in _VERBOSE_SPARK_LEVELS:
        return None
    existing = conf.get(_JAVA_OPTIONS, environment_conf(env).get(_JAVA_OPTIONS, ""))
    if _log4j_configured(existing, env):
        return None
    with resources.as_file(resources.files("deepspark") / "log4j2.properties") as path:
        uri = path.resolve().as_uri()  # a URI: no spaces to quote in the option string
    return f"-Dlog4j2.configurationFile={uri} {existing}".strip()


def _planned_master(master: str | None, given: Mapping[str, str]) -> str | None:
    """The master a new session takes: ``master``, else ``spark.master`` of the settings ``given``, of
    ``spark-defaults.conf``, or ``MASTER``; None where none names one (then ``local[*]``).

    The order is spark-submit's (``SparkSubmitArguments``: Spark properties before ``MASTER``), which
    chooses the master when deepspark sets none: with ``MASTER`` checked first, the master probed and
    the cores counted were not those of the session Spark then started.
    """
    if master is not None:
        return master
    return given.get("spark.master") or environment_conf().get("spark.master") or os.environ.get("MASTER")


def session(
    master: str | None = None,
    *,
    app_name: str = "deepspark",
    conf: Mapping[str, Any] | None = None,
) -> SparkSession:
    """Return the running SparkSession (:func:`running_session`), or start one.

    A running session always wins: deepspark runs inside the user's application as it is (a
    ``master`` or ``conf`` that disagrees with it is logged, not applied, since Spark cannot change
    them on a live context). Without one, ``master`` and ``conf`` configure a new session; the master
    defaults to ``spark.master`` from the configuration (``conf``, ``spark-defaults.conf``, ``MASTER``),
    and to ``local[*]`` only when none names one. Settings from an enclosing :func:`configured` block win
    over ``conf``; ``master`` wins over both.
    """
    from pyspark.sql import SparkSession

    settings_ = _SETTINGS.get() or _Settings()
    active = running_session()
    if active is not None:
        if master is not None and active.sparkContext.master != master:
            _log.warning(
                "using the active SparkSession (master %s); master=%s was not applied",
                active.sparkContext.master,
                master,
            )
        return active
    given = {**{k: str(v) for k, v in (conf or {}).items()}, **settings_.conf}
    planned = _planned_master(master, given)
    check_master(planned)
    if "spark.task.cpus" in given:
        _check_cores("spark.task.cpus", int(given["spark.task.cpus"]), planned or "local[*]")
    settings = {
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.python.worker.reuse": "true",
        **given,
    }
    if master is not None:
        settings["spark.master"] = master
    elif not _names_master(given):
        settings["spark.master"] = "local[*]"
    if not os.environ.get("PYSPARK_PYTHON") and "spark.pyspark.python" not in settings:
        # Python workers must run this interpreter (our virtualenv), not whatever python3 is on PATH.
        os.environ["PYSPARK_PYTHON"] = sys.executable
    if settings_.quiet_start:
        options = quiet_log_options(settings)
        if options is not None:
            settings[_JAVA_OPTIONS] = options
    builder = SparkSession.builder.appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:
        _raise_gateway_error(exc, master)
        raise
    spark.sparkContext.setLogLevel(os.environ.get("DEEPSPARK_SPARK_LOG_LEVEL", "WARN"))
    _log.info("Spark UI: %s (master %s)", spark.sparkContext.uiWebUrl, spark.sparkContext.master)
    return spark


def running_session() -> SparkSession | None:
    """The session this process runs, or None: the calling thread's active session, else the default one.

    pyspark's active session is per thread: called from another thread than the one that built the
    user's session (a web handler, a scheduler's worker, a background thread), :func:`session` found none
    and ran the builder, whose ``getOrCreate`` returned that same session with deepspark's own settings
    applied to it (``spark.sql.execution.arrow.pyspark.enabled`` turned on, the log level set to WARN),
    and the thread checks compared a task's threads with this machine's cores, not the session's."""
    from pyspark.errors import PySparkRuntimeError
    from pyspark.sql import SparkSession

    try:
        return SparkSession.active()
    except PySparkRuntimeError:  # NO_ACTIVE_OR_DEFAULT_SESSION
        return None


def check_master(master: str | None) -> None:
    """Fail fast, with the URL, when a standalone master (``spark://host:port[,host:port]``) does not answer.

    Spark itself retries a dead master for about a minute and then fails with "Cannot call methods on a
    stopped SparkContext" in a long trace; one TCP connect per address takes ``_PROBE_S`` at most and
    needs no JVM. Other masters (local, yarn, k8s) are left to Spark.
    """
    if not master:
        return
    check_master_form(master)
    if not master.startswith("spark://"):
        return
    errors = []
    for address in master[len("spark://") :].split(","):
        host, _, port = address.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"master: expected spark://HOST:PORT, got {master!r}")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=_PROBE_S):
                return  # one live master (of a high-availability list) is enough
        except OSError as exc:
            errors.append(f"{address}: {exc.strerror or exc}")
    raise ConfigError(
        f"master {master}: no Spark master answers ({'; '.join(errors)}); start it "
        "(Spark's sbin/start-master.sh) or fix --master"
    )


_LOCAL_MASTER = re.compile(
    r"local|local\[(\*|[1-9]\d*)(?:\s*,\s*\d+)?\]|local-cluster\[\s*[1-9]\d*\s*,\s*[1-9]\d*\s*,\s*\d+\s*\]"
)


def check_master_form(master: str) -> None:
    """Refuse a master Spark cannot parse (``foo``, ``local[0]``, ``local[-1]``) before any JVM starts:
    Spark fails in the SparkContext's constructor with a Java trace. A URL with a scheme (``spark://``,
    ``k8s://``, an external cluster manager's) and ``yarn`` are left to Spark."""
    if "://" in master or master == "yarn" or _LOCAL_MASTER.fullmatch(master):
        return
    raise fail(
        "master",
        "local, local[N], local[*], local[N,F], local-cluster[E,C,M] (N, E, C >= 1), yarn or a URL such as "
        "spark://HOST:PORT",
        master,
    )


def master_cores(master: str) -> int | None:
    """The cores of one executor of a local master, known before any JVM starts: ``local`` 1,
    ``local[N]`` (and ``local[N,F]``) N, ``local[*]`` every core, ``local-cluster[E,C,M]`` C; None for a
    cluster manager (its executors' cores are the cluster's to say)."""
    text = master.strip()
    if text == "local":
        return 1
    m = re.fullmatch(r"local\[(\*|\d+)(?:,\s*(?:\*|\d+))?\]", text)
    if m is not None:
        return (os.cpu_count() or 1) if m.group(1) == "*" else int(m.group(1))
    m = _LOCAL_CLUSTER.fullmatch(text)
    return int(m.group(2)) if m is not None else None


_LOCAL_CLUSTER = re.compile(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]")  # executors, cores, MB


def executor_cores(spark: SparkSession) -> int | None:
    """The cores of one executor of a live session: its local master's, else ``spark.executor.cores`` when
    set, else None (a standalone executor takes what its worker offers)."""
    sc = spark.sparkContext
    cores = master_cores(str(sc.master))
    if cores is not None:
        return cores
    value = sc.getConf().get("spark.executor.cores", None)
    return int(value) if value else None


def check_task_cpus(name: str, threads: int, *, master: str | None = None) -> None:
    """Raise :class:`ConfigError` (naming ``name``) when a task's ``threads`` exceed one executor's cores.

    Checked against the session :func:`session` would use (the active one, else the one ``master``
    starts), before any JVM starts or job runs: otherwise Spark fails in the SparkContext's constructor
    with a Java trace, or never schedules the task. Where the cores are unknown (a cluster manager
    without ``spark.executor.cores``) nothing is checked.
    """
    active = running_session()
    if active is not None:
        cores, where = executor_cores(active), str(active.sparkContext.master)
    else:
        # The master the session would start on: a cluster's named by --conf or spark-defaults.conf was
        # taken for local[*], and its threads were checked against this machine's cores.
        where = _planned_master(master, (_SETTINGS.get() or _Settings()).conf) or "local[*]"
        check_master_form(where)
        cores = master_cores(where)
    if cores is not None and threads > cores:
        raise _too_many(name, threads, cores, where)


def _check_cores(name: str, threads: int, master: str) -> None:
    cores = master_cores(master)
    if cores is not None and threads > cores:
        raise _too_many(name, threads, cores, master)


def _too_many(name: str, threads: int, cores: int, master: str) -> ConfigError:
    return ConfigError(
        f"{name}: expected at most {cores} (the cores of one executor of {master}), got {threads}; "
        "use fewer threads, or executors with more cores"
    )


_CPUS_PER_TASK = re.compile(r"cores per executor \(=(\d+)\) has to be >= the number of cpus per task = (\d+)")


def _raise_gateway_error(exc: Exception, master: str | None) -> None:
    """Turn a JVM that could not start (no Java, a Java that exits) into a one-line ConfigError."""
    text = f"{type(exc).__name__}: {exc}"
    found = _CPUS_PER_TASK.search(text)
    if found is not None:  # spark.executor.cores below spark.task.cpus, from the user's Spark configuration
        raise _too_many(
            "spark.task.cpus", int(found.group(2)), int(found.group(1)), master or "the configured master"
        ) from exc
    if "JAVA_GATEWAY_EXITED" in text or "Java gateway process exited" in text:
        raise ConfigError(
            "Spark could not start its JVM (Java gateway exited"
            + (f", master {master}" if master else "")
            + "): install Java 17 or 21 (e.g. apt-get install openjdk-17-jre-headless) and set JAVA_HOME, "
            "or see the lines above for Spark's own error"
        ) from exc
    if isinstance(exc, FileNotFoundError) and "java" in text:
        raise ConfigError(
            f"Spark could not start its JVM: no java found ({exc}); install Java 17 or 21 and set JAVA_HOME"
        ) from exc


def _names_master(conf: Mapping[str, str]) -> bool:
    """Whether the user's configuration names a master: then ``local[*]`` must not override it."""
    return (
        "spark.master" in conf
        or bool(os.environ.get("MASTER"))
        or "--master" in os.environ.get("PYSPARK_SUBMIT_ARGS", "").split()
        or "spark.master" in environment_conf()
    )


def task_cpus(spark: SparkSession) -> int:
    """Cores Spark reserves for one task (``spark.task.cpus``, default 1)."""
    value = spark.sparkContext.getConf().get("spark.task.cpus", "1") or "1"
    return int(value)


def total_cores(spark: SparkSession) -> int:
    """The executor cores of the whole cluster.

    ``defaultParallelism`` is that on every cluster manager Spark ships (``local[N]`` gives N), unless the
    session sets ``spark.default.parallelism``, a shuffle setting often put at 2-3 times the cores: then
    a local master's cores are read from its URL, and a cluster manager's are its executors times
    ``spark.executor.cores`` where that is set (else ``defaultParallelism`` as it is: nothing better is
    known). Counting the override as cores let ``fit`` start more workers than could run at once, and
    its rounds waited for them for good.
    """
    sc = spark.sparkContext
    per_executor = executor_cores(spark)
    if sc.getConf().get("spark.default.parallelism", None) is None or per_executor is None:
        return int(sc.defaultParallelism)
    master = str(sc.master).strip()
    cluster = _LOCAL_CLUSTER.fullmatch(master)
    if cluster is not None:  # from its URL: its executors may not have registered yet
        executors = int(cluster.group(1))
    elif master_cores(master) is not None:  # local[N]: the driver is the one executor
        executors = 1
    else:
        executors = max(1, int(sc._jsc.sc().getExecutorMemoryStatus().size()) - 1)  # less the driver
    return executors * per_executor


def total_slots(spark: SparkSession, threads: int = 1) -> int:
    """How many tasks of ``threads`` threads the cluster can run at once without sharing a core:
    :func:`total_cores` // the larger of ``threads`` and ``spark.task.cpus``.

    A task runs the larger of the two (:func:`limit_task_threads`); a live session keeps its
    ``spark.task.cpus`` whatever a caller asks for, so a task's threads can exceed what Spark reserves.
    """
    return max(1, total_cores(spark) // max(threads, task_cpus(spark)))


def cancel_group(sc: Any, group: str, timeout: float = 30.0) -> None:
    """Cancel Spark job group ``group`` and wait, up to ``timeout`` seconds, until none of its tasks runs.

    A cancelled job fails on the driver at once, but its tasks end on the executors later; a task whose
    driver-side endpoint closes meanwhile fails on its own (a broken pipe), which Spark logs as a task
    error with its Python traceback. Callers close their endpoints after this returns.
    """
    sc.cancelJobGroup(group)
    tracker = sc.statusTracker()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = 0
        for job in tracker.getJobIdsForGroup(group):
            info = tracker.getJobInfo(job)
            for stage in info.stageIds if info is not None else ():
                stage_info = tracker.getStageInfo(stage)
                running += stage_info.numActiveTasks if stage_info is not None else 0
        if not running:
            return
        time.sleep(0.05)
    _log.debug("job group %s: tasks still running %.0f s after it was cancelled", group, timeout)


def speculative_copy(sc: Any, stage: int) -> bool:
    """Whether Spark runs a speculative copy of a task of stage ``stage`` beside its original
    (``spark.speculation``): more of the stage's tasks run than are left to finish (its status tracker).

    Spark otherwise runs one attempt of a task at a time, so a new attempt means the old one is dead;
    a long-lived task's copy (``spark.speculation.task.duration.threshold`` speculates one-task stages)
    must not be taken for that."""
    info = sc.statusTracker().getStageInfo(stage)
    return info is not None and info.numActiveTasks > info.numTasks - info.numCompletedTasks


def column(name: str) -> Any:
    """The DataFrame column named exactly ``name``. Spark reads a plain string as a path: ``a.b`` is the
    field ``b`` of a struct ``a`` (or no column at all), and a backtick is a syntax error."""
    from pyspark.sql import functions as F

    return F.col("`" + name.replace("`", "``") + "`")


def job_group(name: str) -> str:
    """A new job group id: ``name`` and a random suffix."""
    return f"{name}-{secrets.token_hex(4)}"


def end_lost_jvms() -> None:
    """End the Spark driver JVMs this process started that no session holds.

    pyspark starts the driver JVM as a child and waits for it to write where it listens; a Ctrl-C in that
    wait loses it, and py4j's server thread then keeps it alive for good (with its heap). Called on the
    way out of an interrupted command; a JVM a session holds ends with this process anyway.
    """
    if "pyspark.java_gateway" not in sys.modules:
        return  # pyspark never got as far as starting a JVM (a Ctrl-C during the imports, say)
    try:
        if running_session() is not None:
            return
    except Exception:  # a half-imported pyspark, a JVM already gone: look for lost JVMs all the same
        pass
    me = os.getpid()
    try:
        entries = [e for e in Path("/proc").iterdir() if e.name.isdigit()]
    except OSError:
        return  # no /proc (not Linux): nothing to look through
    for entry in entries:
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == me and b"org.apache.spark.deploy.SparkSubmit" in command:
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGTERM)


def release_broadcast(broadcast: Any) -> None:
    """Destroy ``broadcast`` on the way out of a job, whatever the job did. A JVM that is ending (a
    SIGTERM sent to the whole process group reaches it too) cannot destroy it and has nothing left to
    free: its error is logged, so that it never replaces how the job ended (a finished study, predictions
    waiting to be moved into place, an interruption)."""
    try:
        broadcast.destroy()
    except Exception as exc:
        _log.debug("could not destroy a broadcast (the JVM is ending?): %s", exc)


def run_job(
    sc: Any,
    action: Callable[[], Any],
    *,
    group: str,
    cancel_when: Callable[[], bool] | None = None,
) -> BaseException | None:
    """Run the Spark action ``action`` in a thread under the job group ``group`` (:func:`job_group`);
    return its error, or None when it succeeded.

    The calling thread waits in Python, where Ctrl-C reaches it (a main thread blocked inside a Py4J
    call cannot run pyspark's SIGINT handler, whose own Py4J call then fails with a stack of tracebacks):
    on Ctrl-C the group is cancelled, its tasks are waited for (:func:`cancel_group`) and the
    KeyboardInterrupt goes on. When ``cancel_when()`` turns true the job is cancelled the same way.
    """
    outcome: list[BaseException | None] = [None]
    ended = threading.Event()

    def run() -> None:
        sc.setJobGroup(group, group, interruptOnCancel=True)
        try:
            action()
        except BaseException as exc:
            outcome[0] = exc
        finally:
            ended.set()

    threading.Thread(target=run, name=group, daemon=True).start()
    try:
        # Not Thread.join: in Python 3.11 a join cut short by Ctrl-C can leave the thread looking finished.
        while not ended.wait(0.5):
            if cancel_when is not None and cancel_when():
                _cancel_until_ended(sc, group, ended)
                break
    except KeyboardInterrupt:
        _cancel_until_ended(sc, group, ended)
        raise
    return outcome[0]


def job_result(sc: Any, action: Callable[[], _T], *, group: str) -> _T:
    """``action()``'s result, the action run as :func:`run_job` runs it (a thread, the job group
    ``group``, cancelled on Ctrl-C); its error is raised."""
    result: list[_T] = []
    failure = run_job(sc, lambda: result.append(action()), group=group)
    if failure is not None:
        raise failure
    return result[0]


def _cancel_until_ended(sc: Any, group: str, ended: threading.Event, timeout: float = 60.0) -> None:
    """Cancel ``group`` until the action's thread has ended (up to ``timeout`` seconds).

    Spark cancels the group's *active* jobs only: an action still planning its job (a write's, say)
    submits it after the first cancel, and that job then ran on after the caller had destroyed its
    broadcasts (Spark logged an INTERNAL_ERROR_BROADCAST trace after "deepspark: interrupted")."""
    deadline = time.monotonic() + timeout
    cancel_group(sc, group)
    while not ended.wait(0.1) and time.monotonic() < deadline:
        cancel_group(sc, group)


def limit_threads(threads: int) -> None:
    """Make this process's torch and BLAS use ``threads`` threads (call inside a Spark task).

    A task owns ``spark.task.cpus`` cores; using more oversubscribes the executor (hyperopt#921).
    """
    check_positive_int("threads", threads)
    for name in _THREAD_ENV:  # for BLAS/OpenMP libraries loaded from now on
        os.environ[name] = str(threads)
    from threadpoolctl import threadpool_limits

    # The ones already loaded ignore the variables: numpy's OpenBLAS, imported with the worker, kept
    # every core until this call (measured: threadpool_info() said 2 threads after the env and torch).
    threadpool_limits(limits=threads)
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    try:
        if torch.get_num_interop_threads() != 1:
            torch.set_num_interop_threads(1)
    except RuntimeError:
        # set_num_interop_threads may only be called once, before any inter-op work started.
        pass


def freeze_worker_objects() -> None:
    """Put every object this Python worker holds now (its modules, a model it loaded) out of the cyclic
    garbage collector's walks (:func:`gc.freeze`); call it in a task, after its imports and model load.

    pyspark's daemon runs a full ``gc.collect()`` after each task of a reused worker. With torch and
    onnxruntime imported that walked 176,000 objects: 75-90 ms of a core after every task, 4 of the 22
    core-seconds of predicting 70,000 images in 35 tasks. A frozen object is still freed when nothing
    refers to it; only one in a reference cycle stays, until :func:`thaw_worker_objects`."""
    import gc

    gc.freeze()


def thaw_worker_objects() -> None:
    """Give what :func:`freeze_worker_objects` froze back to the collector, and collect: call it when the
    worker lets a model go, or the parts of it that lie in reference cycles stay for the worker's life."""
    import gc

    gc.unfreeze()
    gc.collect()


def limit_task_threads(requested: int, context: Any = None) -> int:
    """Limit this Spark task's threads (:func:`limit_threads`) to the larger of ``requested`` and the
    cores Spark gave it (``spark.task.cpus``, from ``context``: a ``TaskContext`` or ``BarrierTaskContext``;
    None outside a task); return that count. The driver sized the task's parallelism for it."""
    threads = max(requested, context.cpus() if context is not None else 1)
    limit_threads(threads)
    return threads


def task_memory(given: int | None, env: Mapping[str, str] | None = None) -> tuple[int | None, str | None]:
    """Inside a Spark task: how many bytes of rows it may keep in memory, and the folder for the rest.

    ``given`` is the user's budget; without one, half of ``spark.executor.pyspark.memory`` where it is
    set (Spark then limits the Python worker's address space to it: the model, torch and the batches
    need the other half), else a quarter of the memory this host has available now (a host runs several
    workers), else no bound. The folder is Spark's local directory for the task (``spark.local.dir``;
    None: the system's temporary folder)."""
    env = os.environ if env is None else env
    local = (env.get("SPARK_LOCAL_DIRS") or "").split(",")[0] or None
    if given is not None:
        return given, local
    limit = env.get("PYSPARK_EXECUTOR_MEMORY_MB", "")
    if limit.isdigit():
        return int(limit) * (1 << 20) // 2, local
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4, local
    except (OSError, ValueError, IndexError):
        pass
    return None, local


DEVICES = ("auto", "cpu", "cuda")


def check_gpu_request(spark: SparkSession, device: str) -> None:
    """On the driver, before any job: ``device='cuda'`` needs Spark to assign tasks GPUs, or every task
    would fail on its own with the same error (exit 1, and a page of Spark's lines)."""
    if device != "cuda":
        return
    amount = spark.sparkContext.getConf().get("spark.task.resource.gpu.amount")
    try:
        assigned = amount is not None and float(amount) > 0
    except ValueError:
        assigned = False
    if not assigned:
        raise ConfigError(
            "device 'cuda': Spark assigns tasks no GPU (spark.task.resource.gpu.amount is not set); set it, "
            "with spark.executor.resource.gpu.amount and a discovery script, or use --device auto or cpu"
        )


def assigned_gpus(context: Any = None) -> list[str]:
    """The addresses of the GPUs Spark assigned this task (``TaskContext.resources()``; ``context`` or
    the current task's); empty outside a task or without GPU scheduling."""
    if context is None:
        from pyspark import TaskContext

        context = TaskContext.get()
    gpus = context.resources().get("gpu") if context is not None else None
    return [str(a) for a in gpus.addresses] if gpus is not None else []


def device_label(device: Any, gpus: Sequence[str]) -> str:
    """How a task's device is reported (``devices:`` lines, trials' records): ``cpu``, ``cuda:0``, and the
    GPU Spark assigned when there was one (``cpu (Spark assigned GPU 3)`` says CUDA could not use it)."""
    return str(device) + (f" (Spark assigned GPU {','.join(gpus)})" if gpus else "")


def task_device(requested: str = "auto", context: Any = None) -> Any:
    """The torch device a Spark task should use: the GPU Spark assigned it, else the CPU.

    Spark assigns GPUs through its resource scheduling (``spark.task.resource.gpu.amount`` and a
    discovery script on the workers); the task finds the address in ``TaskContext.resources()``.
    ``auto`` uses that GPU when CUDA can, the CPU otherwise; ``cuda`` insists (an assigned GPU that CUDA
    cannot use, or none assigned, is an error naming why: never a silent fall back); ``cpu`` ignores GPUs.
    """
    import torch

    if requested not in DEVICES:
        raise ConfigError(f"device: expected one of {list(DEVICES)}, got {requested!r}")
    if requested == "cpu":
        return torch.device("cpu")
    addresses = assigned_gpus(context)
    if addresses and torch.cuda.is_available():
        index, why = _cuda_index(str(addresses[0]), os.environ.get("CUDA_VISIBLE_DEVICES"))
        if index is not None and index < torch.cuda.device_count():
            return torch.device(f"cuda:{index}")
        why = why or f"CUDA sees {torch.cuda.device_count()} device(s)"
    elif addresses:
        why = "CUDA is not available to torch in this Python worker"
    else:
        why = "Spark assigned this task no GPU (set spark.task.resource.gpu.amount)"
    if requested == "cuda":
        where = f"GPU {addresses[0]}" if addresses else "a GPU"
        raise ConfigError(f"device 'cuda': cannot use {where}: {why}; use --device auto or cpu")
    return torch.device("cpu")


def _cuda_index(address: str, visible: str | None) -> tuple[int | None, str]:
    """The CUDA ordinal of the GPU Spark assigned as ``address``, or None and why not.

    Spark's discovery scripts report GPUs as ``nvidia-smi`` numbers them (all of the machine's), while
    CUDA numbers only those ``CUDA_VISIBLE_DEVICES`` lists, in its order: where a worker's environment
    sets it, GPU "3" under ``CUDA_VISIBLE_DEVICES=2,3`` is ``cuda:1``, and a GPU it hides is unusable.
    """
    entries = [e.strip() for e in visible.split(",") if e.strip()] if visible else []
    if entries:
        if address in entries:
            return entries.index(address), ""
        return None, f"CUDA_VISIBLE_DEVICES={visible} hides it from this Python worker"
    if not address.isdigit():
        return None, "its address is not a CUDA device index and CUDA_VISIBLE_DEVICES is not set"
    return int(address), ""
