"""snakembed: image folders in, CNN embeddings and class predictions out, one HDF5 file per folder.

Reading results::

    import snakembed
    store = snakembed.open_store("results")
    store["animals"].matrix()               # [N, D] float32
    store.lookup("animals/chelsea.jpg").label
    snakembed.search(store, store.lookup("animals/chelsea.jpg").embedding, top=5)
    snakembed.export("results", "results/export.parquet")
"""

from importlib.metadata import PackageNotFoundError, version

from .export import export
from .reader import open_store
from .search import search

try:
    __version__ = version("snakembed")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["export", "open_store", "search", "__version__"]
