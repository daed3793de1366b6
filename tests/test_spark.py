"""The environment's Spark configuration and the quiet start (pure helpers; no JVM)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from deepspark.spark import _names_master, environment_conf, quiet_log_options


def _defaults(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spark-defaults.conf").write_text(text, encoding="utf-8")
    return directory


def test_spark_defaults_conf_is_read_from_spark_conf_dir_else_spark_home(tmp_path: Path) -> None:
    text = (
        "# a comment\n! another\nspark.master   spark://h:7077\nspark.a=1\nspark.b: two words\nspark.c = 3\n"
    )
    conf_dir = _defaults(tmp_path / "conf", text)
    expected = {"spark.master": "spark://h:7077", "spark.a": "1", "spark.b": "two words", "spark.c": "3"}
    assert environment_conf({"SPARK_CONF_DIR": str(conf_dir)}) == expected
    assert environment_conf({"SPARK_HOME": str(tmp_path)}) == expected
    assert environment_conf({"SPARK_HOME": str(tmp_path / "none")}) == {}
    assert environment_conf({}) == {}


def test_local_is_the_default_only_when_nothing_names_a_master(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("MASTER", "PYSPARK_SUBMIT_ARGS", "SPARK_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path / "empty"))
    assert not _names_master({})
    assert _names_master({"spark.master": "yarn"})
    monkeypatch.setenv("PYSPARK_SUBMIT_ARGS", "--master spark://h:7077 pyspark-shell")
    assert _names_master({})
    monkeypatch.delenv("PYSPARK_SUBMIT_ARGS")
    monkeypatch.setenv("SPARK_CONF_DIR", str(_defaults(tmp_path / "conf", "spark.master yarn\n")))
    assert _names_master({})


def test_quiet_start_passes_our_log4j2_file_to_the_driver_jvm(tmp_path: Path) -> None:
    shipped = resources.files("deepspark") / "log4j2.properties"
    text = shipped.read_text(encoding="utf-8")
    assert "rootLogger.level = warn" in text
    for logger in ("org.apache.spark.util.Utils", "org.apache.hadoop.util.NativeCodeLoader"):
        assert f"name = {logger}\n" in text
    options = quiet_log_options({}, {})
    assert options is not None and options.startswith("-Dlog4j2.configurationFile=file:///")
    assert options.endswith("/deepspark/log4j2.properties")
    # The user's own options are kept, whether given as conf or in spark-defaults.conf.
    assert quiet_log_options({"spark.driver.extraJavaOptions": "-Xss4m"}, {}).endswith(" -Xss4m")  # type: ignore[union-attr]
    conf_dir = _defaults(tmp_path / "conf", "spark.driver.extraJavaOptions -Dx=1 -Dy=2\n")
    assert quiet_log_options({}, {"SPARK_CONF_DIR": str(conf_dir)}).endswith(" -Dx=1 -Dy=2")  # type: ignore[union-attr]


def test_quiet_start_gives_way_to_the_users_logging(tmp_path: Path) -> None:
    assert quiet_log_options({}, {"DEEPSPARK_SPARK_LOG_LEVEL": "info"}) is None
    assert quiet_log_options({}, {"DEEPSPARK_SPARK_LOG_LEVEL": "ERROR"}) is not None
    own = {"spark.driver.extraJavaOptions": "-Dlog4j2.configurationFile=/etc/mine.properties"}
    assert quiet_log_options(own, {}) is None
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "log4j2.properties").write_text("rootLogger.level = info\n", encoding="utf-8")
    assert quiet_log_options({}, {"SPARK_CONF_DIR": str(conf_dir)}) is None
