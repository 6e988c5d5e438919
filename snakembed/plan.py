"""Checking a configuration against the image tree and the plugins before any job runs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ._files import atomic_path
from ._registry import import_object
from .backbones import (
    BACKBONES,
    PRE_LOGITS,
    LayerError,
    WeightsError,
    backbone_from_config,
    is_local_weights,
    model_file_hashes,
)
from .config import ConfigError, numbers_fingerprint, validate_config
from .devices import resolve_compute
from .heads import HEADS, needs_labels
from .images import Discovery, DiscoveryError, discover_folders
from .labels import LabelError, Labelled, labels_from_config
from .layout import FOLDERS_DIR, ROOT_FOLDER, folder_file, folder_stem
from .manifest import failed_job, folder_manifest, read_manifest, write_manifest
from .store import computed_from, stale_copy

#: Where the finetune rule writes its checkpoint, under the results folder.
FINETUNE_CHECKPOINT = "finetune/checkpoint.safetensors"

#: The rule of the folder jobs, whose logs and benchmarks are kept per folder.
FOLDER_RULE = "embed_classify_store"

# The errors are re-exported so that callers can catch every planning error from here.
__all__ = [
    "FINETUNE_CHECKPOINT",
    "FOLDER_RULE",
    "ConfigError",
    "DiscoveryError",
    "Plan",
    "WeightsError",
    "asks_for_gpu",
    "plan_run",
]


@dataclass
class Plan:
    """What the workflow will do.

    Attributes:
        images: the image root.
        results: the results folder.
        discovery: every image folder, with the files refused and the folder links skipped;
            None in a plan read from the manifests (see :func:`plan_run`).
        stems: ``{file stem: folder key}`` (the ``{folder}`` wildcard's values).
        weights_file: the local checkpoint, when ``model.weights`` is one.
        numbers: everything that changes the embeddings (see ``numbers_fingerprint``).
        compute: the resolved ``device`` and ``precision``, with what was configured.
        change_detection: how the manifests identify an image's content.
        settings: what besides its images decides a folder's file (recorded in each
            manifest, see :class:`~snakembed.manifest.FolderManifest`).
        labelled: the labelled images of ``classify.labels``, when set.
        missed: the folders whose file :meth:`write_manifests` found computed from other
            images or settings than their unchanged manifest says, and moved aside.
    """

    images: Path
    results: Path
    discovery: Discovery | None
    stems: Mapping[str, str]
    weights_file: str | None
    numbers: dict
    compute: dict
    change_detection: str = "stat"
    settings: dict = field(default_factory=dict)
    labelled: Labelled | None = None
    missed: list[str] = field(default_factory=list)

    @property
    def folders(self) -> dict[str, list[str]]:
        """``{folder key: sorted image file names}``.

        Raises:
            RuntimeError: in a plan read from the manifests, which has only :meth:`image_count`.
        """
        if self.discovery is None:
            raise RuntimeError("a plan read from the manifests has no image tree; read them")
        return self.discovery.folders

    def image_count(self, stem: str) -> int:
        """How many image files the folder of file stem ``stem`` holds, refused ones included."""
        if self.discovery is None:
            return len(read_manifest(self.manifest_file(stem)).names)
        return len(self.discovery.folders[self.stems[stem]])

    def manifest_file(self, stem: str) -> Path:
        """Where the folder of file stem ``stem`` has its manifest (see :mod:`.manifest`)."""
        return _manifest_folder(self.results) / f"{stem}.json"

    def write_manifests(self) -> int:
        """Write each folder's manifest where what it holds changed, remove the manifests of
        folders that are gone, and record the resolved device and precision for the cluster
        jobs' own Snakemake (``{results}/compute.json``).

        A folder whose manifest did not change, whose job started on it and failed (Snakemake
        then restores the previous file of an ``update()`` output and still records the job as
        done), and whose file was not computed from it, is *missed*: its file is moved aside
        (see :func:`snakembed.store.stale_copy`), so that Snakemake sees it missing and
        recomputes it, reusing the embeddings of its unchanged images from the moved file.

        Returns:
            How many manifests were written.
        """
        written = 0
        self.missed.clear()
        checksum = self.change_detection == "checksum"
        root = os.path.abspath(self.images)
        with ThreadPoolExecutor(max_workers=8 if checksum else 1) as pool:
            for stem, key in self.stems.items():
                manifest = folder_manifest(
                    root,
                    key,
                    self.folders[key],
                    self.discovery.refused.get(key),
                    change_detection=self.change_detection,
                    map_=pool.map,
                    settings=self.settings,
                )
                path = self.manifest_file(stem)
                if write_manifest(manifest, path):
                    written += 1
                elif self._moved_aside(stem, path):
                    self.missed.append(key)
        for stem in set(_ManifestStems(self.results)) - set(self.stems):
            self.manifest_file(stem).unlink(missing_ok=True)
        for note in _manifest_folder(self.results).rglob("*.json.started"):
            if not note.with_suffix("").exists():
                note.unlink(missing_ok=True)
        _remove_empty_folders(_manifest_folder(self.results))
        text = json.dumps(self.compute, indent=1, sort_keys=True) + "\n"
        path = _compute_file(self.results)
        if not path.is_file() or path.read_text() != text:
            with atomic_path(path) as tmp:
                tmp.write_text(text)
        return written

    def _moved_aside(self, stem: str, manifest: Path) -> bool:
        """Move the folder's file aside when a job started on its manifest and failed (see
        :func:`~snakembed.manifest.failed_job`), and the file was not computed from it."""
        output = folder_file(self.results, self.stems[stem])
        failed = failed_job(manifest)
        if failed is None:
            return False  # no job failed on it (a dry run may have written the manifest)
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
        if failed != digest or not output.is_file() or computed_from(output) == digest:
            return False
        os.replace(output, stale_copy(output))
        return True

    def stale_files(self) -> list[Path]:
        """The results of folders that are no longer in the image tree: their ``.h5`` files,
        logs and benchmarks (a deleted or renamed folder's), and temporary files that killed
        writers left there.

        Raises:
            RuntimeError: in a plan read from the manifests, which does not know the tree.
        """
        if self.discovery is None:
            raise RuntimeError("a plan read from the manifests cannot tell which folders are gone")
        stale = []
        for folder, suffix in (
            (self.results / FOLDERS_DIR, ".h5"),
            (self.results / "logs" / FOLDER_RULE, ".log"),
            (self.results / "benchmarks" / FOLDER_RULE, ".tsv"),
        ):
            for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
                target = path
                if path.name.startswith(".") and path.name.endswith((".tmp", ".stale")):
                    # a killed writer's temporary file (.{name}.{pid}.tmp) or a file moved
                    # aside to be recomputed (.{name}.stale)
                    stripped = path.name[1:].removesuffix(".stale")
                    if stripped.endswith(".tmp"):
                        stripped = stripped.rsplit(".", 2)[0]
                    target = path.with_name(stripped)
                relative = target.relative_to(folder).as_posix()
                gone = relative.removesuffix(suffix) not in self.stems
                if path.is_file() and relative.endswith(suffix) and gone:
                    stale.append(path)
        return stale

    def prune(self) -> list[Path]:
        """Remove :meth:`stale_files`, and the folders they leave empty.

        Returns:
            What was removed.
        """
        removed = self.stale_files()
        for path in removed:
            path.unlink(missing_ok=True)
        for top in (FOLDERS_DIR, f"logs/{FOLDER_RULE}", f"benchmarks/{FOLDER_RULE}"):
            _remove_empty_folders(self.results / top)
        return removed

    def manifest_digest(self, stem: str) -> str:
        """The sha256 of the folder's manifest file as written (see :meth:`write_manifests`).

        The workflow passes it as a rule parameter: it changes when the folder's images do, and
        Snakemake reruns a job whose parameters changed.
        """
        return hashlib.sha256(self.manifest_file(stem).read_bytes()).hexdigest()

    def labelled_inputs(self) -> list[str]:
        """The labelled images that Snakemake tracks as inputs (which orders the jobs).

        Snakemake reads ``{name}`` in a path as a wildcard, so files whose path holds a brace
        are left out; :meth:`labelled_identity` covers every image.
        """
        return _trackable(str(p) for p in self.labelled.paths) if self.labelled else []

    def labelled_identity(self) -> str:
        """The sha256 of the labelled images and their labels: each image's path, label,
        split, size, modification time, inode and status-change time (see
        :mod:`.manifest`), so that a labels file or image replaced by one with an older
        modification time (``cp -p``, ``mv``), which Snakemake's own check of the inputs'
        times would miss, still trains the head again.

        The workflow passes it as a parameter of the jobs that read the labelled images.
        """
        if self.labelled is None:
            return ""
        rows = []
        for path, label, split in zip(
            self.labelled.paths, self.labelled.labels, self.labelled.splits, strict=True
        ):
            try:
                info = os.stat(path)
                stat = [info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns]
            except OSError as exc:
                stat = [str(exc.strerror)]
            rows.append([str(path), label, split, stat])
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def warnings(self) -> list[str]:
        """One line per folder link that was not followed, and per folder with refused files
        (none in a plan read from the manifests: the planning process warned)."""
        if self.discovery is None:
            return []
        lines = [f"not followed: {path}: {why}" for path, why in self.discovery.skipped.items()]
        for folder, refused in self.discovery.refused.items():
            lines.append(f"{folder}: {len(refused)} file(s) will be recorded as failed, not read")
        return lines


def _manifest_folder(results: Path) -> Path:
    return results / "manifests"


def _compute_file(results: Path) -> Path:
    return results / "compute.json"


def _remove_empty_folders(top: Path) -> None:
    """Remove the empty folders below ``top`` (not ``top`` itself), deepest first."""
    if not top.is_dir():
        return
    for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)


def asks_for_gpu(resources: Mapping[str, object]) -> bool:
    """Whether a rule's resources (Snakemake's ``--set-resources`` for it, as the slurm
    profile gives the folder jobs) ask for a GPU: ``gpu`` or ``gpus`` above 0, or a ``gres``
    naming one.

    Example:
        >>> asks_for_gpu({"gpu": 1}), asks_for_gpu({"gres": "gpu:a100:2"}), asks_for_gpu({})
        (True, True, False)
    """
    for name in ("gpu", "gpus", "gres"):
        value = resources.get(name)
        try:
            value = getattr(value, "value", value)  # Snakemake's Resource
        except Exception:  # noqa: BLE001 - a value computed per job: not known here
            continue
        if name == "gres":
            if value and "gpu" in str(value):
                return True
            continue
        with contextlib.suppress(TypeError, ValueError):
            if value is not None and int(value) > 0:
                return True
    return False


class _ManifestStems(Mapping[str, str]):
    """``{file stem: folder key}`` of the manifests under ``results``, each read when asked for.

    Listing the manifests is one walk of a folder with a file per image folder; reading them
    all, or discovering the image tree again, would cost every cluster job far more.
    """

    def __init__(self, results: Path):
        folder = _manifest_folder(results)
        self._folder = folder
        self._stems = sorted(
            path.relative_to(folder).as_posix().removesuffix(".json")
            for path in folder.rglob("*.json")
        )
        self._known = set(self._stems)

    def __getitem__(self, stem: str) -> str:
        if stem not in self._known:
            raise KeyError(stem)
        return read_manifest(self._folder / f"{stem}.json").folder

    def __iter__(self) -> Iterator[str]:
        return iter(self._stems)

    def __len__(self) -> int:
        return len(self._stems)


def _has_brace(path: str) -> bool:
    return "{" in path or "}" in path


def _trackable(paths) -> list[str]:
    return [p for p in paths if not _has_brace(p)]


def plan_run(config: dict, *, discover: bool = True, gpu_jobs: bool = False) -> Plan:
    """Validate ``config``, resolve its device and precision, discover the image folders and
    check the named plugins.

    ``device: auto`` and ``precision: auto`` are resolved here, once for the whole run, and
    written into ``config`` (so that every job, its worker and the fingerprint of the numbers
    see the same concrete values): ``cuda`` and bf16 when the folder jobs ask for a GPU
    (``gpu_jobs``) or torch sees one on this machine, else ``cpu`` and fp32. Jobs check that
    the device they were planned for exists where they run.

    Args:
        config: the workflow's configuration (defaults are filled in, and device and
            precision resolved, in place).
        discover: walk the image tree; False takes the folders from the manifests that the
            planning process wrote (:meth:`Plan.write_manifests`), as each cluster job's own
            Snakemake does: walking a tree of millions of files on a shared filesystem in every
            job would cost more than the jobs. Such a plan takes the planning process's
            device and precision from ``{results}/compute.json``.
        gpu_jobs: whether the folder jobs ask the cluster for a GPU (see :func:`asks_for_gpu`).

    Returns:
        The plan.

    Raises:
        ConfigError: for anything that would make the run fail, naming the key and the fix.
        DiscoveryError: for an image tree that cannot be used.
    """
    validate_config(config)
    _check_plugins(config)
    _check_model(config)
    _check_sizes(config)
    if _has_brace(config["results"]):
        raise ConfigError(
            f"config key 'results': {config['results']!r} holds a brace, which Snakemake reads "
            "as a wildcard; choose a results folder without { or }"
        )
    weights_file = (
        config["model"]["weights"] if is_local_weights(config["model"]["weights"]) else None
    )
    results = Path(config["results"])
    compute = _resolve(config, results, planned=not discover, gpu_jobs=gpu_jobs)
    config.update({key: compute[key] for key in ("device", "precision", "decode")})
    numbers = _numbers(config)
    settings = {
        "numbers": hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest(),
        "classify": config["classify"],
    }
    discovery = _discover(config) if discover else None
    return Plan(
        images=Path(config["images"]),
        results=results,
        discovery=discovery,
        stems=_stems(discovery, config) if discovery else _ManifestStems(results),
        weights_file=weights_file,
        numbers=numbers,
        compute=compute,
        change_detection=config["change_detection"],
        settings=settings,
        labelled=_labelled(config),
    )


def _numbers(config: dict) -> dict:
    """What changes the numbers: the config's fingerprint and, by content, the checkpoint and
    a custom network's source (a checkpoint replaced by ``mv`` or ``cp -p`` keeps an old
    modification time, which Snakemake's own input check would take as unchanged). The
    finetune rule's checkpoint is Snakemake's to track: it is written during the run."""
    from .worker import hash_cache

    model = config["model"]
    if is_local_weights(model["weights"]) and _is_finetune_output(model["weights"], config):
        model = {**model, "weights": "none"}
    return {**numbers_fingerprint(config), **model_file_hashes(model, hash_cache())}


def _resolve(config: dict, results: Path, *, planned: bool, gpu_jobs: bool) -> dict:
    """The run's concrete device and precision, with what was configured: read from what the
    planning process recorded (``planned``) when it was planned with the same settings, else
    resolved here."""
    configured = {key: config[key] for key in ("device", "precision", "decode")}
    if planned:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            recorded = json.loads(_compute_file(results).read_text())
            if recorded["configured"] == configured:
                return recorded
    resolved = resolve_compute(**configured, gpu=True if gpu_jobs else None)
    return {**resolved, "configured": configured}


def _discover(config: dict) -> Discovery:
    return discover_folders(
        config["images"],
        config["extensions"],
        exclude=config["results"],
        follow_external_links=config["follow_external_links"],
    )


def _stems(discovery: Discovery, config: dict) -> dict[str, str]:
    stems: dict[str, str] = {}
    for key in discovery.folders:
        stem = folder_stem(key)
        if stem in stems:
            raise DiscoveryError(
                f"folders {stems[stem]!r} and {key!r} under {config['images']!r} would share the "
                f"results file {stem}.h5 (images directly in the root are stored as "
                f"{folder_stem(ROOT_FOLDER)!r}, and braces as %7B and %7D); rename one of them"
            )
        stems[stem] = key
    return stems


def _labelled(config: dict) -> Labelled | None:
    settings = config["classify"]
    if settings["labels"] is None:
        if needs_labels(settings["head"]):
            raise ConfigError(
                f"config key 'classify.labels': head {settings['head']!r} is trained on labelled "
                "images; set classify.labels to a CSV of path,label rows or to a folder with "
                "train/ and val/ class folders"
            )
        return None
    try:
        return labels_from_config(config)
    except LabelError as exc:
        raise ConfigError(f"config key 'classify.labels': {exc}") from None


def _check_plugins(config: dict) -> None:
    model = config["model"]
    if model["name"] == "custom":  # module and kwargs without it: see validate_config
        _check_custom(model)
    for registry, name, key in (
        (BACKBONES, model["name"], "model.name"),
        (HEADS, config["classify"]["head"], "classify.head"),
    ):
        if key == "classify.head" and name == "none":
            continue
        try:
            registry.factory(name)
        except LookupError as exc:
            also = ", or none for embeddings only" if key == "classify.head" else ""
            raise ConfigError(f"config key {key!r}: {exc}{also}") from None


def _check_model(config: dict) -> None:
    """Build the network on the CPU when a job could otherwise fail on it: a local checkpoint
    (does it fit?), a layer other than pre_logits (does it exist?), or another pooling."""
    model = config["model"]
    head = config["classify"]["head"]
    if model["layer"] != PRE_LOGITS and head == "pretrained":
        raise ConfigError(
            f"config key 'classify.head': the pretrained head classifies pre_logits features, "
            f"not layer {model['layer']!r}; set classify.head to linear, knn or none"
        )
    local = is_local_weights(model["weights"])
    if local and not Path(model["weights"]).is_file():
        if _is_finetune_output(model["weights"], config):
            return  # the finetune rule writes it first
        raise ConfigError(
            f"config key 'model.weights': checkpoint {model['weights']!r} does not exist; give an "
            "existing file, a weights name, `default` or `none`"
        )
    if not local and model["layer"] == PRE_LOGITS and model["pool"] == "avg":
        return  # nothing a job could trip on that is not checked already; stay fast
    try:
        backbone_from_config({**model, "weights": model["weights"] if local else "none"})
    except LayerError as exc:
        key = "model.pool" if model["layer"] == PRE_LOGITS else "model.layer"
        raise ConfigError(f"config key {key!r}: {exc}") from None
    except WeightsError as exc:
        raise ConfigError(f"config key 'model.weights': {exc}") from None


def _is_finetune_output(weights: str, config: dict) -> bool:
    """Whether ``weights`` is the checkpoint that the finetune rule writes."""
    output = Path(config["results"]) / FINETUNE_CHECKPOINT
    return os.path.normpath(weights) == os.path.normpath(output)


def _check_custom(model: dict) -> None:
    if not model["module"]:
        raise ConfigError(
            "config key 'model.module': name: custom needs your network's class or factory, "
            "as `package.module:Name`"
        )
    try:
        import_object(model["module"])
    except ValueError as exc:
        raise ConfigError(f"config key 'model.module': {exc}") from None


def _check_sizes(config: dict) -> None:
    """Sizes that pass the schema one by one but cannot work together."""
    pre, patches = config["preprocess"], config["patches"]
    if pre["resize"] is not None and pre["crop"] is not None and pre["crop"] > pre["resize"]:
        raise ConfigError(
            f"config key 'preprocess.crop': {pre['crop']} is larger than preprocess.resize "
            f"({pre['resize']}), so every image would be padded with black; lower crop or raise "
            "resize"
        )
    if (
        patches["enabled"]
        and patches["border"] == "drop"
        and patches["resize"] is not None
        and patches["size"] > patches["resize"]
    ):
        raise ConfigError(
            f"config key 'patches.size': {patches['size']} is larger than patches.resize "
            f"({patches['resize']}) with border: drop, so no image would have a patch; lower "
            "patches.size, raise patches.resize, or set patches.border to pad or shift"
        )
