"""snakembed: image folders in, CNN embeddings and class predictions out, one HDF5 file per folder.

Reading results::

    import snakembed
    store = snakembed.open_store("results")
    store["animals"].matrix()               # [N, D] float32
    store.lookup("animals/chelsea.jpg").label
"""

from importlib.metadata import PackageNotFoundError, version

from .reader import open_store

try:
    __version__ = version("snakembed")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["open_store", "__version__"]
