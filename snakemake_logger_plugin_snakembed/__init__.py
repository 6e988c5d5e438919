"""A Snakemake logger plugin that shows how many images a run has embedded, how fast, and how
long the rest will take: ``snakemake --logger snakembed``.

Snakemake keeps its own console output: this handler does not claim the stream (Snakemake drops
its console handler only for a plugin that does), and adds lines of its own on stderr as folder
jobs finish, at most one every ``interval`` seconds, and a last one when the folder jobs are
done::

    snakembed: 1,234 of 5,000 images (24 %), 56.7 images/s, about 1 min 7 s left

The image totals come from one record that the workflow logs when jobs are about to run
(``show_image_progress`` in workflow/rules/common.smk): its ``snakembed_images`` attribute maps
each folder key to embed to its image count. A folder job is told by its rule (its
name ends with ``embed_classify_store``, so that a rule renamed by a ``module`` import counts)
and its ``folder`` wildcard, from Snakemake's JOB_INFO records; JOB_FINISHED and JOB_ERROR
records say when it ended. Without the totals record the lines count folder jobs instead (out
of Snakemake's job stats, when those came).

The workflow attaches this handler itself when ``--logger snakembed`` did not (see
:func:`attach`): Snakemake finds logger plugins only among the top-level packages on
``sys.path``, which an editable install (``pip install -e .``) does not put there.

This module is imported whenever Snakemake starts (to list the plugins), so it imports nothing
heavy.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from snakemake_interface_logger_plugins.base import LogHandlerBase
from snakemake_interface_logger_plugins.common import LogEvent
from snakemake_interface_logger_plugins.settings import LogHandlerSettingsBase

__all__ = [
    "FOLDER_RULE",
    "IMAGES_KEY",
    "LogHandler",
    "LogHandlerSettings",
    "attach",
    "format_duration",
    "images_extra",
    "images_message",
]

#: The rule of the folder jobs (snakembed.plan.FOLDER_RULE, not imported: see above).
FOLDER_RULE = "embed_classify_store"
#: The record attribute that carries ``{folder key: image count}`` of the folder jobs to run.
IMAGES_KEY = "snakembed_images"
#: The prefix of every line this handler writes.
_PREFIX = "snakembed: "
#: The logger of snakemake.logging, where Snakemake's console handler is.
_SNAKEMAKE_LOGGER = "snakemake.logging"


@dataclass
class LogHandlerSettings(LogHandlerSettingsBase):
    """``--logger-snakembed-interval``: the least number of seconds between two lines."""

    interval: float = field(
        default=5.0,
        metadata={
            "help": "Least number of seconds between two progress lines (default 5).",
            # the type itself: with postponed annotations, the field's type is a string
            "type": float,
        },
    )


class LogHandler(LogHandlerBase):
    """Counts the images of finished folder jobs and writes progress lines on stderr."""

    def __post_init__(self) -> None:
        interval = getattr(self.settings, "interval", None)
        self.interval = 5.0 if interval is None else max(float(interval), 0.0)
        self.stream: TextIO | None = None  # None: sys.stderr as it is when a line is written
        self.clock: Callable[[], float] = time.monotonic
        self.silent = _is_silent(self.common_settings)
        #: {folder key: image count} of the folder jobs to run; None until the record comes.
        self.totals: dict[str, int] | None = None
        #: Folder jobs to run, from Snakemake's job stats (without the totals record).
        self.stats_jobs: int | None = None
        self.folders: dict[Any, str] = {}  # jobid -> folder key, from JOB_INFO
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.started: float | None = None  # when the first folder job started
        self.last_line: float | None = None
        self.last_state: tuple[int, int] | None = None
        self.finished_line = False
        self.complete = False  # Snakemake counted every job done
        self._progress_lock = threading.Lock()

    @property
    def writes_to_stream(self) -> bool:
        # False although it writes on stderr: Snakemake keeps its own console handler only
        # when no plugin claims the stream, and these lines are meant to come in addition.
        return False

    @property
    def writes_to_file(self) -> bool:
        return False

    @property
    def has_filter(self) -> bool:
        # Its own: Snakemake's default filter would drop the records of --quiet progress, which
        # this handler needs to count even when it says nothing (see _is_silent).
        return True

    @property
    def has_formatter(self) -> bool:
        return True

    @property
    def needs_rulegraph(self) -> bool:
        return False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with self._progress_lock:
                self._handle(record)
        except Exception:  # a progress line must never stop a run
            self.handleError(record)

    def close(self) -> None:
        """Write the count that the interval held back: a run stopped, or folder jobs that
        never started (their input failed)."""
        with self._progress_lock:
            if not self.finished_line and self._state() != self.last_state:
                self._write(final=True)
        super().close()

    # The records

    def _handle(self, record: logging.LogRecord) -> None:
        images = getattr(record, IMAGES_KEY, None)
        if isinstance(images, Mapping):
            self.totals = {str(k): int(v) for k, v in images.items()}
            return
        event = getattr(record, "event", None)
        if event == LogEvent.RUN_INFO:
            self._read_stats(getattr(record, "stats", None))
        elif event == LogEvent.JOB_INFO:
            self._job_started(record)
        elif event == LogEvent.JOB_FINISHED:
            self._job_ended(getattr(record, "job_id", None), failed=False)
        elif event == LogEvent.JOB_ERROR:
            self._job_ended(getattr(record, "jobid", None), failed=True)
        elif event == LogEvent.PROGRESS:
            self._progress(getattr(record, "done", None), getattr(record, "total", None))

    def _progress(self, done: object, total: object) -> None:
        """Snakemake's "N of M steps done": the end of a run whose folder jobs were not
        counted (no totals record, no job stats)."""
        if isinstance(done, int) and isinstance(total, int) and done >= total:
            self.complete = True
            if not self.finished_line:
                self._write(final=True)

    def _read_stats(self, stats: object) -> None:
        if isinstance(stats, Mapping):
            jobs = [n for rule, n in stats.items() if _is_folder_rule(rule)]
            if jobs:
                self.stats_jobs = sum(int(n) for n in jobs)

    def _job_started(self, record: logging.LogRecord) -> None:
        if not _is_folder_rule(getattr(record, "rule_name", None)):
            return
        wildcards = getattr(record, "wildcards", None)
        folder = None
        if isinstance(wildcards, Mapping):  # a shard's job (a folder's, before shards)
            folder = wildcards.get("shard", wildcards.get("folder"))
        if folder is None:
            return
        folder = str(folder)
        self.folders[getattr(record, "jobid", None)] = folder
        self.failed.discard(folder)  # started again (--retries)
        if self.started is None:
            self.started = self.clock()

    def _job_ended(self, jobid: object, failed: bool) -> None:
        folder = self.folders.get(jobid)
        if folder is None:
            return
        if failed:
            self.failed.add(folder)
        else:
            self.failed.discard(folder)
            self.done.add(folder)
        now = self.clock()
        if self._all_ended():
            self._write(final=True)
        elif not failed and (self.last_line is None or now - self.last_line >= self.interval):
            self._write(final=False)

    # The lines

    def _all_ended(self) -> bool:
        if self.complete:
            return True
        expected = self._expected_folders()
        return expected is not None and len(self.done | self.failed) >= expected

    def _expected_folders(self) -> int | None:
        if self.totals is not None:
            return len(self.totals)
        return self.stats_jobs

    def _state(self) -> tuple[int, int]:
        return len(self.done), len(self.failed)

    def _write(self, final: bool) -> None:
        self.last_line = self.clock()
        self.last_state = self._state()
        self.finished_line = final
        if self.silent or (not self.done and not self.failed):
            return
        stream = self.stream or sys.stderr
        line = _PREFIX + self._line(final) + "\n"
        # Snakemake's console handler writes a message and its newline apart: as a plugin (in
        # the thread of Snakemake's queue listener), a line could land between the two.
        consoles = _console_handlers()
        for handler in consoles:
            handler.acquire()
        try:
            stream.write(line)
            stream.flush()
        finally:
            for handler in reversed(consoles):
                handler.release()

    def _line(self, final: bool) -> str:
        elapsed = self.clock() - self.started if self.started is not None else 0.0
        if self.totals is not None:
            done = sum(self.totals.get(folder, 0) for folder in self.done)
            failed = sum(self.totals.get(folder, 0) for folder in self.failed)
            total = sum(self.totals.values())
            unit = "images"
        else:
            done, failed, total, unit = len(self.done), len(self.failed), self.stats_jobs, None
        parts = [_count(done, total, unit or "folder jobs")]
        rate = done / elapsed if elapsed > 0 else None
        if rate is not None:
            parts.append(f"{rate:,.1f} {unit or 'folder jobs'}/s")
        if final:
            # close() without every folder job ended: a run stopped, or folders never started
            ended = "done in" if self._all_ended() else "ended after"
            parts.append(f"{ended} {format_duration(elapsed)}")
        elif total is not None and rate:
            parts.append(f"about {format_duration((total - done - failed) / rate)} left")
        if self.failed:
            what = _plural(failed, "image") if unit else _plural(failed, "folder job")
            parts.append(f"{_plural(len(self.failed), 'folder job')} failed ({what})")
        if unit is None and total is None:
            parts[0] = f"{done:,} folder jobs done"
        return ", ".join(parts)


def attach(manager: Any) -> LogHandler | None:
    """Add a :class:`LogHandler` to Snakemake's logger, unless ``--logger snakembed`` did.

    Args:
        manager: ``workflow.logger_manager`` (a ``snakemake.logging.LoggerManager``).

    Returns:
        The handler added, or None where one was there.
    """
    if any(isinstance(h, LogHandler) for h in manager.get_log_handlers()):
        return None
    if any(isinstance(h, LogHandler) for h in manager.logger.handlers):
        return None
    handler = LogHandler(manager.settings, None)
    manager.logger.addHandler(handler)
    return handler


def images_extra(images: Mapping[str, int]) -> dict[str, Any]:
    """The ``extra`` of the totals record: the counts, and the quietness that ``--quiet
    progress`` hides its message by."""
    from snakemake.settings.enums import Quietness

    return {IMAGES_KEY: dict(images), "quietness": Quietness.PROGRESS}


def images_message(images: Mapping[str, int], folders: int | None = None) -> str:
    """The readable text of the totals record (``images``: per shard job).

    >>> images_message({"1-of-2": 3000, "2-of-2": 2000}, folders=40)
    '5,000 images in 40 folders (2 jobs) to embed'
    """
    jobs = _plural(len(images), "job")
    where = f"{_plural(folders, 'folder')} ({jobs})" if folders is not None else jobs
    return f"{_plural(sum(images.values()), 'image')} in {where} to embed"


def format_duration(seconds: float) -> str:
    """A duration as a person reads it, to the second under an hour.

    >>> format_duration(67.4), format_duration(42), format_duration(7325), format_duration(0.2)
    ('1 min 7 s', '42 s', '2 h 2 min', '0 s')
    """
    seconds = max(round(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {seconds} s"
    return f"{seconds} s"


def _count(done: int, total: int | None, unit: str) -> str:
    if total is None:
        return f"{done:,} {unit}"
    # rounded as Snakemake's own line rounds its steps, but 100 % only when all are done
    percent = min(round(100 * done / total), 99 if done < total else 100) if total else 100
    return f"{done:,} of {total:,} {unit} ({percent} %)"


def _console_handlers() -> list[logging.Handler]:
    """Snakemake's handlers that write on stdout or stderr."""
    return [
        handler
        for handler in logging.getLogger(_SNAKEMAKE_LOGGER).handlers
        if isinstance(handler, logging.StreamHandler)
        and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)
    ]


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'s' * (count != 1)}"


def _is_folder_rule(name: object) -> bool:
    return isinstance(name, str) and name.endswith(FOLDER_RULE)


def _is_silent(settings: Any) -> bool:
    """A dry run, or ``--quiet`` (all) or ``--quiet progress``."""
    if getattr(settings, "dryrun", False):
        return True
    quiet = {str(getattr(q, "name", q)).lower() for q in getattr(settings, "quiet", None) or ()}
    return bool(quiet & {"all", "progress"})
