"""The on-disk layout of a results folder: the names its writer and its readers share.

A results folder holds ``embeddings/{stem}.h5`` per image folder (see :func:`folder_file`;
images directly in the image root are the folder ``.``, stored as ``_root.h5``) and
``index.h5``, whose groups mirror the image tree and link every folder file.

A folder file holds:

- root attributes: ``format_version`` (:data:`FORMAT_VERSION`), the folder's key in
  ``folder``, provenance (``model``, ``weights``, ``layer``, ``pool``, ``embedding_dim`` ...),
  and JSON-encoded settings and failures (:data:`JSON_ATTRS`; ``failed`` maps an image id to
  why it could not be embedded);
- bulk datasets whose names start with ``_``, one row per embedded image in ``_ids`` order
  (:data:`REQUIRED_DATASETS`, then :data:`LABELS` and :data:`SCORES` with classification and
  :data:`PATCH_EMBEDDINGS`, :data:`PATCH_BOXES`, :data:`PATCH_OFFSETS` with patches):
  ``_embeddings`` is ``[N, D]``, or ``[N, H*W, D]`` for a layer stored with ``pool: none``;
- a group per embedded image, named by its id (a file name, which always ends in an image
  extension and so never clashes with the ``_`` names), holding :data:`IMAGE_EMBEDDING` and,
  when stored, :data:`IMAGE_TOPK_LABELS`, :data:`IMAGE_TOPK_SCORES`,
  :data:`IMAGE_PATCH_EMBEDDINGS`, :data:`IMAGE_PATCH_BOXES`, with attributes ``source``,
  ``width``, ``height``, ``sha256`` and, with classification, ``label`` and ``score``.

The index's root attributes are ``format_version``, ``images_root`` and ``folders`` (a JSON
list of every folder key).

Only the standard library is imported here: reading results must stay light.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "EMBEDDINGS",
    "FOLDERS_DIR",
    "FORMAT_VERSION",
    "HEIGHT",
    "IDS",
    "IMAGE_EMBEDDING",
    "IMAGE_PATCH_BOXES",
    "IMAGE_PATCH_EMBEDDINGS",
    "IMAGE_TOPK_LABELS",
    "IMAGE_TOPK_SCORES",
    "INDEX_FILE",
    "JSON_ATTRS",
    "LABELS",
    "PATCH_BOXES",
    "PATCH_EMBEDDINGS",
    "PATCH_OFFSETS",
    "REQUIRED_DATASETS",
    "ROOT_FOLDER",
    "ROOT_STEM",
    "SCORES",
    "SHA256",
    "SOURCES",
    "WIDTH",
    "folder_file",
    "folder_stem",
]

#: The version of this layout, written to every file; readers refuse newer files.
FORMAT_VERSION = 1

#: The folder key of images that lie directly in the image root.
ROOT_FOLDER = "."

#: The file stem of :data:`ROOT_FOLDER`'s file.
ROOT_STEM = "_root"

#: The results subfolder that holds the folder files.
FOLDERS_DIR = "embeddings"

#: The index file, directly in the results folder.
INDEX_FILE = "index.h5"

# bulk datasets of a folder file, one row per embedded image
IDS = "_ids"
SOURCES = "_sources"
SHA256 = "_sha256"
WIDTH = "_width"
HEIGHT = "_height"
EMBEDDINGS = "_embeddings"
LABELS = "_labels"
SCORES = "_scores"
PATCH_EMBEDDINGS = "_patch_embeddings"
PATCH_BOXES = "_patch_boxes"
PATCH_OFFSETS = "_patch_offsets"

#: The bulk datasets every folder file has, all of the same length.
REQUIRED_DATASETS = (IDS, SOURCES, SHA256, WIDTH, HEIGHT, EMBEDDINGS)

# datasets of an image's group
IMAGE_EMBEDDING = "embedding"
IMAGE_TOPK_LABELS = "topk_labels"
IMAGE_TOPK_SCORES = "topk_scores"
IMAGE_PATCH_EMBEDDINGS = "patch_embeddings"
IMAGE_PATCH_BOXES = "patch_boxes"

#: The root attributes of a folder file that hold JSON text.
JSON_ATTRS = ("preprocess", "patches", "versions", "classify", "failed", "settings")


def folder_stem(folder: str) -> str:
    """The file stem of a folder key: the key itself, or ``_root`` for the image root.

    Braces become ``%7B`` and ``%7D``: Snakemake would read ``{name}`` in a path as a wildcard.

    Args:
        folder: a folder key (``/``-separated, relative to the image root).

    Returns:
        The stem of the folder's file, relative to :data:`FOLDERS_DIR`.

    Example:
        >>> folder_stem("a/b"), folder_stem("."), folder_stem("x{1}")
        ('a/b', '_root', 'x%7B1%7D')
    """
    if folder == ROOT_FOLDER:
        return ROOT_STEM
    return folder.replace("{", "%7B").replace("}", "%7D")


def folder_file(results: str | Path, folder: str) -> Path:
    """Where a folder's HDF5 file lives: ``{results}/embeddings/{stem}.h5``.

    Args:
        results: the results folder.
        folder: a folder key.

    Returns:
        The file's path (see :func:`folder_stem` for the stem).

    Example:
        >>> folder_file("results", ".").as_posix()
        'results/embeddings/_root.h5'
    """
    return Path(results) / FOLDERS_DIR / f"{folder_stem(folder)}.h5"
