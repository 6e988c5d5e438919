"""Progress in images (issue 17): the logger plugin fed Snakemake's records, and a real run."""

from __future__ import annotations

import io
import logging
import os
import re
from types import SimpleNamespace

import pytest
from conftest import REPO, make_image, run_snakemake, write_config
from snakemake_interface_logger_plugins.common import LogEvent
from snakemake_interface_logger_plugins.tests import MockOutputSettings, TestLogHandlerBase

import snakemake_logger_plugin_snakembed as plugin
from snakembed.plan import FOLDER_RULE

#: A progress line (not the plan's line, which says what changed and ends with the shards to run).
LINE = re.compile(r"^snakembed: (?!.*(?:to run|up to date)$).*$", re.MULTILINE)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _handler(interval: float = 5.0, **settings) -> tuple[plugin.LogHandler, _Clock]:
    common = MockOutputSettings()
    for key, value in settings.items():
        setattr(common, key, value)
    handler = plugin.LogHandler(common, plugin.LogHandlerSettings(interval=interval))
    handler.stream = io.StringIO()
    handler.clock = clock = _Clock()
    return handler, clock


def _record(event: LogEvent | None = None, msg: str = "", **extra) -> logging.LogRecord:
    record = logging.LogRecord("snakemake.logging", logging.INFO, "x.py", 1, msg, (), None)
    if event is not None:
        record.event = event
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def _totals(handler, images: dict[str, int]) -> None:
    handler.handle(_record(msg=plugin.images_message(images), **plugin.images_extra(images)))


def _start(handler, jobid: int, folder: str, rule: str = FOLDER_RULE) -> None:
    handler.handle(
        _record(LogEvent.JOB_INFO, jobid=jobid, rule_name=rule, wildcards={"folder": folder})
    )


def _finish(handler, jobid: int) -> None:
    handler.handle(_record(LogEvent.JOB_FINISHED, job_id=jobid))


def _lines(handler) -> list[str]:
    return LINE.findall(handler.stream.getvalue())


def test_lines_count_images_their_rate_and_the_time_left():
    handler, clock = _handler()
    _totals(handler, {"a": 1000, "b": 3000, "c": 1000})
    _start(handler, 1, "a")
    _start(handler, 2, "b")
    clock.now += 20
    _finish(handler, 1)  # 1,000 images in 20 s: 50/s, 4,000 left: 80 s
    assert _lines(handler) == [
        "snakembed: 1,000 of 5,000 images (20 %), 50.0 images/s, about 1 min 20 s left"
    ]
    _start(handler, 3, "c")
    clock.now += 60
    _finish(handler, 2)  # 4,000 in 80 s
    clock.now += 20
    _finish(handler, 3)  # the last: a final line at once
    assert _lines(handler)[1:] == [
        "snakembed: 4,000 of 5,000 images (80 %), 50.0 images/s, about 20 s left",
        "snakembed: 5,000 of 5,000 images (100 %), 50.0 images/s, done in 1 min 40 s",
    ]
    handler.close()  # nothing new to say
    assert len(_lines(handler)) == 3


def test_lines_come_at_most_once_an_interval_and_the_last_at_the_end():
    handler, clock = _handler(interval=5)
    _totals(handler, {f"f{i}": 10 for i in range(6)})
    for i in range(6):
        _start(handler, i, f"f{i}")
    for i in range(5):
        clock.now += 1
        _finish(handler, i)  # at 1, 2, 3, 4 and 5 s: lines at 1 s and 6 s only
    assert _lines(handler) == [
        "snakembed: 10 of 60 images (17 %), 10.0 images/s, about 5 s left",
    ]
    clock.now += 1
    _finish(handler, 5)
    assert _lines(handler)[-1] == ("snakembed: 60 of 60 images (100 %), 10.0 images/s, done in 6 s")


def test_close_writes_the_line_that_the_interval_held_back():
    handler, clock = _handler(interval=60)
    _totals(handler, {"a": 4, "b": 4, "c": 4})
    for i, folder in enumerate("abc"):
        _start(handler, i, folder)
    clock.now += 2
    _finish(handler, 0)
    clock.now += 2
    _finish(handler, 1)  # held back; c never ends (the run was stopped)
    assert len(_lines(handler)) == 1
    handler.close()
    assert _lines(handler)[-1] == (
        "snakembed: 8 of 12 images (67 %), 2.0 images/s, ended after 4 s"
    )


def test_other_rules_and_unknown_jobs_are_not_counted():
    handler, clock = _handler()
    _totals(handler, {"a": 2})
    _start(handler, 7, "ignored", rule="index")
    handler.handle(_record(LogEvent.JOB_INFO, jobid=8, rule_name=FOLDER_RULE, wildcards={}))
    _start(handler, 1, "a", rule=f"snakembed_{FOLDER_RULE}")  # renamed by a module import
    clock.now += 1
    for jobid in (7, 8, 99):
        _finish(handler, jobid)
    assert _lines(handler) == []
    _finish(handler, 1)
    assert _lines(handler) == ["snakembed: 2 of 2 images (100 %), 2.0 images/s, done in 1 s"]


def test_failed_folders_leave_the_estimate_and_a_retry_brings_them_back():
    handler, clock = _handler(interval=0)
    _totals(handler, {"a": 10, "b": 30, "c": 10})
    for i, folder in enumerate("abc"):
        _start(handler, i, folder)
    clock.now += 1
    handler.handle(_record(LogEvent.JOB_ERROR, jobid=1, rule_name=FOLDER_RULE))
    _finish(handler, 0)  # 10 done, 30 failed: 10 left at 10/s
    assert _lines(handler) == [
        "snakembed: 10 of 50 images (20 %), 10.0 images/s, about 1 s left, "
        "1 folder job failed (30 images)"
    ]
    _start(handler, 3, "b")  # --retries: b runs again
    clock.now += 4
    _finish(handler, 2)
    _finish(handler, 3)
    assert _lines(handler)[-1] == ("snakembed: 50 of 50 images (100 %), 10.0 images/s, done in 5 s")


def test_a_failed_last_folder_ends_the_run_with_a_final_line():
    handler, clock = _handler()
    _totals(handler, {"a": 10, "b": 30})
    _start(handler, 0, "a")
    _start(handler, 1, "b")
    clock.now += 10
    _finish(handler, 0)
    handler.handle(_record(LogEvent.JOB_ERROR, jobid=1, rule_name=FOLDER_RULE))
    assert _lines(handler)[-1] == (
        "snakembed: 10 of 40 images (25 %), 1.0 images/s, done in 10 s, "
        "1 folder job failed (30 images)"
    )


def test_without_the_totals_record_lines_count_folder_jobs_from_the_job_stats():
    handler, clock = _handler()
    stats = {"weights_fetch": 1, f"snakembed_{FOLDER_RULE}": 4, "index": 1, "total": 6}
    handler.handle(_record(LogEvent.RUN_INFO, msg="Job stats: ...", stats=stats))
    for i in range(4):
        _start(handler, i, f"f{i}")
    clock.now += 10
    _finish(handler, 0)
    assert _lines(handler) == [
        "snakembed: 1 of 4 folder jobs (25 %), 0.1 folder jobs/s, about 30 s left"
    ]


def test_without_any_totals_lines_say_how_many_folder_jobs_are_done():
    handler, clock = _handler(interval=0)
    handler.handle(_record(LogEvent.RUN_INFO, msg="Job stats", stats=None))
    handler.handle(_record(LogEvent.PROGRESS, done=1, total=3))
    handler.handle(_record(msg="some message"))
    _start(handler, 1, "a")
    _finish(handler, 1)  # no time has passed: no rate
    clock.now += 4
    _start(handler, 2, "b")
    _finish(handler, 2)
    handler.handle(_record(LogEvent.PROGRESS, done=3, total=3))  # the run's end
    handler.close()
    assert _lines(handler) == [
        "snakembed: 1 folder jobs done",
        "snakembed: 2 folder jobs done, 0.5 folder jobs/s",
        "snakembed: 2 folder jobs done, 0.5 folder jobs/s, done in 4 s",
    ]


def test_a_broken_record_never_stops_the_run(monkeypatch):
    handler, _ = _handler()
    monkeypatch.setattr(logging, "raiseExceptions", False)  # as handleError reports it
    handler.handle(_record(**{plugin.IMAGES_KEY: {"a": "many"}}))
    handler.handle(_record(LogEvent.RUN_INFO, stats={FOLDER_RULE: "four"}))
    handler.handle(_record(LogEvent.JOB_INFO, jobid=[1], rule_name=FOLDER_RULE, wildcards={}))
    handler.close()
    assert _lines(handler) == []


@pytest.mark.parametrize(
    "settings", [{"dryrun": True}, {"quiet": {"all"}}, {"quiet": {"progress", "rules"}}]
)
def test_a_dry_run_or_quiet_progress_says_nothing(settings):
    from snakemake.settings.enums import Quietness

    if "quiet" in settings:
        settings = {"quiet": {Quietness.parse_choice(q) for q in settings["quiet"]}}
    handler, clock = _handler(interval=0, **settings)
    _totals(handler, {"a": 1})
    _start(handler, 1, "a")
    clock.now += 1
    _finish(handler, 1)
    handler.close()
    assert handler.stream.getvalue() == ""


def test_durations_read_as_a_person_says_them():
    assert plugin.format_duration(59.6) == "1 min 0 s"
    assert plugin.format_duration(3600) == "1 h 0 min"
    assert plugin.format_duration(-3) == "0 s"
    assert plugin.images_message({"1-of-1": 1}) == "1 image in 1 job to embed"
    assert plugin.images_message({"1-of-2": 4, "2-of-2": 2}, 3) == (
        "6 images in 3 folders (2 jobs) to embed"
    )


def test_the_examples_in_the_docstrings_hold():
    import doctest

    assert doctest.testmod(plugin).failed == 0


def test_the_folder_rule_is_the_workflows():
    assert plugin.FOLDER_RULE == FOLDER_RULE


def test_attach_adds_one_handler_unless_the_logger_option_did():
    logger = logging.getLogger("test_progress.attach")
    manager = SimpleNamespace(
        logger=logger, settings=MockOutputSettings(), get_log_handlers=lambda: []
    )
    try:
        added = plugin.attach(manager)
        assert isinstance(added, plugin.LogHandler) and added in logger.handlers
        assert plugin.attach(manager) is None  # attached already
        by_option = SimpleNamespace(
            logger=logging.getLogger("test_progress.option"),
            settings=manager.settings,
            get_log_handlers=lambda: [added],
        )
        assert plugin.attach(by_option) is None
        assert by_option.logger.handlers == []
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)


def test_the_interval_is_a_command_line_option():
    """As Snakemake registers a plugin's settings (a field's type must be callable)."""
    import argparse

    from snakemake_interface_logger_plugins.registry import LoggerPluginRegistry

    found = LoggerPluginRegistry().load_plugin("snakembed", plugin)
    parser = argparse.ArgumentParser()
    found.register_cli_args(parser, "logger")
    settings = found.get_settings(parser.parse_args(["--logger-snakembed-interval", "2.5"]))
    assert settings.interval == 2.5
    assert found.get_settings(parser.parse_args([])).interval == 5.0


class TestInterface(TestLogHandlerBase):
    """The interface package's own checks of a logger plugin."""

    __test__ = True

    def get_log_handler_cls(self):
        return plugin.LogHandler

    def get_log_handler_settings(self):
        return plugin.LogHandlerSettings()

    def test_keeps_snakemakes_console_output(self):
        handler = self._create_handler()
        assert not handler.writes_to_stream and not handler.writes_to_file


def _tree(tmp_path) -> dict[str, int]:
    layout = {"a": 3, "b/c": 2, "d": 1}
    for folder, count in layout.items():
        for i in range(count):
            make_image(tmp_path / "images" / folder / f"{i}.jpg", seed=i)
    return layout


def test_a_run_shows_its_images(tmp_path, workers):
    """The workflow adds the handler itself (an editable install hides the plugin from
    Snakemake), logs the image totals, and the last line counts every image."""
    _tree(tmp_path)
    config = write_config(tmp_path / "config.yaml", images="images", results="results")
    proc = run_snakemake(tmp_path, config, env=workers.env)
    assert re.search(r"6 images in 3 folders \(\d jobs?\) to embed", proc.stderr)
    assert "snakembed: 3 folders to compute; " in proc.stderr  # the plan's line
    lines = LINE.findall(proc.stderr)
    assert lines, proc.stderr[-4000:]
    assert re.fullmatch(
        r"snakembed: 6 of 6 images \(100 %\), [\d,]+\.\d images/s, done in \d+ (s|min \d+ s)",
        lines[-1],
    )
    assert all(" of 6 images (" in line for line in lines)
    # every one on a line of its own (beside the plan's)
    assert proc.stderr.count("snakembed: ") == len(lines) + 1
    assert "steps (100%) done" in proc.stderr  # Snakemake's own output stays


def test_the_logger_option_uses_the_plugin_once(tmp_path, workers):
    """Where Snakemake finds the plugin (here: the repository on PYTHONPATH, as a wheel
    install puts it in site-packages), ``--logger snakembed`` adds it, and the workflow
    does not add a second one."""
    _tree(tmp_path)
    config = write_config(tmp_path / "config.yaml", images="images", results="results")
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = run_snakemake(
        tmp_path, config, "--logger", "snakembed", env={**workers.env, "PYTHONPATH": path}
    )
    lines = LINE.findall(proc.stderr)
    # every line on a line of its own: the plugin writes from the thread of Snakemake's queue
    # listener, between Snakemake's own messages (and beside the plan's line)
    assert proc.stderr.count("snakembed: ") == len(lines) + 1, proc.stderr[-4000:]
    finals = [line for line in lines if " done in " in line]
    assert len(finals) == 1 and finals[0].startswith("snakembed: 6 of 6 images (100 %)")
