"""`snakembed run`'s command line: Snakemake in the results folder, every path made absolute."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from snakembed.run import snakemake_command
from snakembed.workflow import profile, snakefile


def _config(cmd: list[str]) -> list[str]:
    start = cmd.index("--config") + 1
    end = next((i for i in range(start, len(cmd)) if cmd[i].startswith("--")), len(cmd))
    return cmd[start:end]


def test_snakemake_runs_the_packaged_workflow_in_the_results_folder(tmp_path):
    cmd = snakemake_command("photos", "out", base=tmp_path)
    assert cmd[1:3] == ["-m", "snakemake"]
    assert cmd[cmd.index("--snakefile") + 1] == str(snakefile())
    assert cmd[cmd.index("--directory") + 1] == str(tmp_path / "out")
    assert cmd[cmd.index("--cores") + 1] == "all"
    assert _config(cmd) == [f"images={tmp_path / 'photos'}", f"results={tmp_path / 'out'}"]
    assert "--dry-run" not in cmd


def test_paths_are_taken_against_where_the_command_was_typed(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "ckpt.pt").touch()
    file = tmp_path / "sub" / "my.yaml"
    file.write_text(yaml.safe_dump({"model": {"weights": "../ckpt.pt"}, "threads": 1}))
    cmd = snakemake_command(
        "../photos",
        "../out",
        configfiles=["my.yaml"],
        config=["classify={head: linear, labels: labels.csv}", "threads=3"],
        base=tmp_path / "sub",
    )
    assert cmd[cmd.index("--configfile") + 1] == str(file)
    config = _config(cmd)
    assert config[:2] == ["classify={head: linear, labels: labels.csv}", "threads=3"]
    assert f"images={tmp_path / 'photos'}" in config
    absolute = [yaml.safe_load(entry.partition("=")[2]) for entry in config[4:]]
    assert {"weights": str(tmp_path / "ckpt.pt")} in absolute
    assert {"labels": str(tmp_path / "sub" / "labels.csv")} in absolute


@pytest.mark.parametrize(
    "value",
    [
        "4",
        "0.5",
        "1e3",
        "True",
        "true",
        "",
        "null",
        "~",
        "'quoted'",
        '"a b"',
        "[1, 2]",
        "{head: knn, k: 3}",
        "{a: {b: [x, 'y']}}",
        "a: b",
        "x #y",
        "0x10",
        "1_000",
    ],
)
def test_config_values_are_read_exactly_as_snakemake_reads_them(value):
    from snakemake.cli import parse_config

    from snakembed.run import _config_entry

    assert _config_entry(f"threads={value}") == parse_config([f"threads={value}"])


def test_paths_snakemake_would_cut_short_are_refused(tmp_path):
    """Snakemake reads a --config value as YAML, where ': ' and ' #' would cut a path short:
    results would go elsewhere than the folder Snakemake works in."""
    from snakemake.cli import parse_config

    for images, results, which in (("ph: 24", "out", "IMAGES"), ("ph", "out #1", "--results")):
        with pytest.raises(ValueError, match=f"^{which} .*would not read this path whole"):
            snakemake_command(images, results, base=tmp_path)
    cmd = snakemake_command("my photos (2024)", "out, v2", config=["threads=2"], base=tmp_path)
    config = parse_config(_config(cmd))
    assert config["images"] == str(tmp_path / "my photos (2024)")
    assert config["results"] == str(tmp_path / "out, v2") == cmd[cmd.index("--directory") + 1]
    assert config["threads"] == 2


def test_named_weights_stay_names(tmp_path):
    cmd = snakemake_command(
        "p", config=["model={name: resnet50, weights: IMAGENET1K_V2}"], base=tmp_path
    )
    assert len(_config(cmd)) == 3  # the user's entry, images, results: nothing added


def test_profiles_options_and_snakemake_arguments(tmp_path):
    cmd = snakemake_command(
        "p", profile_name="slurm", dry_run=True, snakemake_args=["--forceall"], base=tmp_path
    )
    assert cmd[cmd.index("--profile") + 1] == str(profile("slurm"))
    assert "--cores" not in cmd  # the profile decides
    assert cmd[-2:] == ["--dry-run", "--forceall"]
    assert (profile("slurm") / "config.yaml").is_file()
    own = tmp_path / "mine"
    own.mkdir()
    cmd = snakemake_command("p", profile_name="mine", cores="3", base=tmp_path)
    assert cmd[cmd.index("--profile") + 1] == str(own)
    assert cmd[cmd.index("--cores") + 1] == "3"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"configfiles": ["missing.yaml"]}, "--configfile .*missing.yaml: no such file"),
        ({"config": ["threads"]}, "give KEY=VALUE"),
        ({"config": ["results=x"]}, "--results option"),
        ({"cores": "my.yaml"}, r"--cores my.yaml: .* or all \(a config file is --configfile"),
        ({"cores": "0"}, r"--cores 0: give a number of cores, 1 or more, or all$"),
        ({"config": ["model={name: resnet18"]}, "expected ',' or '}'.*check its braces"),
        ({"configfiles": ["empty.yaml"]}, "empty.yaml is empty: give KEY: VALUE lines"),
        ({"configfiles": ["five.yaml"]}, "five.yaml: results: 5; give a folder path"),
    ],
)
def test_mistakes_name_the_fix(tmp_path, kwargs, message):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    (tmp_path / "five.yaml").write_text("results: 5\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        snakemake_command("p", base=tmp_path, **kwargs)


def test_results_come_from_the_option_else_the_last_config_file_else_results(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"results": "from_a", "threads": 1}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"threads": 2}))

    def directory(**kwargs) -> str:
        cmd = snakemake_command("p", base=tmp_path, **kwargs)
        return cmd[cmd.index("--directory") + 1]

    assert directory(configfiles=["a.yaml", "b.yaml"]) == str(tmp_path / "from_a")
    assert directory(results="out", configfiles=["a.yaml"]) == str(tmp_path / "out")
    assert directory(configfiles=["b.yaml"]) == str(tmp_path / "results")
    (tmp_path / "home.yaml").write_text(yaml.safe_dump({"results": "~/snakembed-out"}))
    assert directory(configfiles=["home.yaml"]) == str(Path.home() / "snakembed-out")


def test_results_inside_the_images_are_refused_before_snakemake_starts(tmp_path, monkeypatch):
    from snakembed.run import run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photo.jpg").touch()
    for results in ("photos", "photos/results"):
        with pytest.raises(ValueError, match="lies inside IMAGES photos"):
            run("photos", results)
    with pytest.raises(FileNotFoundError, match="IMAGES photo.jpg: not a folder"):
        run("photo.jpg")
    with pytest.raises(ValueError, match="--results photo.jpg: a file, not a folder"):
        run("photos", "photo.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg", "photos"]
    assert not any((tmp_path / "photos").iterdir())  # nothing written into the images


def test_unknown_profiles_and_a_missing_slurm_plugin_name_the_fix(tmp_path, monkeypatch):
    import importlib.util

    with pytest.raises(FileNotFoundError, match="--profile lcoal: no such profile; choose local"):
        snakemake_command("p", profile_name="lcoal", base=tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "snakemake_executor_plugin_slurm" else real(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match=r'pip install "snakembed\[slurm\]"'):
        snakemake_command("p", profile_name="slurm", base=tmp_path)


@pytest.mark.parametrize(
    ("config", "configfile", "message"),
    [
        (["batch_size=0"], None, r"config key 'batch_size': 0 is less than the minimum of 1"),
        (["modle={weights: x}"], None, r"'modle' is unknown: did you mean 'model'\?"),
        (["worker={idle: nan}"], None, r"config key 'worker.idle': nan is not a number"),
        (["classify={topk: many}"], None, r"config key 'classify.topk'"),
        ([], {"model": {"pool": "maximum"}}, r"config key 'model.pool'"),
        (["model={pool: avg}"], {"model": {"pool": "maximum"}}, None),  # --config wins
    ],
)
def test_the_configuration_is_checked_before_snakemake_starts(
    tmp_path, config, configfile, message
):
    """What Snakemake would see: the packaged config, the files, then the --config entries."""
    files = []
    if configfile:
        files = [tmp_path / "my.yaml"]
        files[0].write_text(yaml.safe_dump(configfile))
    if message is None:
        snakemake_command("p", configfiles=files, config=config, base=tmp_path)
        return
    from snakembed.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        snakemake_command("p", configfiles=files, config=config, base=tmp_path)


def test_config_values_are_read_as_snakemake_reads_them(tmp_path):
    """Numbers, True/False and YAML of strings: the early check reads each --config entry as
    Snakemake's own parse_config does, passes it on unchanged, and the schema then gives the
    workflow the values the user meant."""
    from snakemake.cli import parse_config

    from snakembed.config import load_config, merge_config
    from snakembed.run import _config_entry
    from snakembed.workflow import workflow_dir

    entries = [
        "classify={topk: 3, head: none}",
        "worker={shared: false}",
        "threads=4",
        "optimize=False",
        "preprocess={draft: true, resize: 300}",
    ]
    cmd = snakemake_command("p", config=entries, base=tmp_path)
    assert _config(cmd)[: len(entries)] == entries
    snakemake_reads = parse_config(entries)
    ours: dict = {}
    for entry in entries:
        merge_config(ours, _config_entry(entry))
    assert ours == snakemake_reads
    config = load_config(workflow_dir() / "config.yaml", snakemake_reads)
    assert (config["classify"]["topk"], config["classify"]["head"]) == (3, "none")
    assert config["worker"]["shared"] is False and config["optimize"] is False
    assert config["threads"] == 4 and type(config["threads"]) is int
    assert config["preprocess"]["draft"] is True and config["preprocess"]["resize"] == 300


@pytest.mark.parametrize(
    ("arg", "fix"),
    [
        ("--config", "give --config KEY=VALUE before the --"),
        ("--config=threads=1", "give --config KEY=VALUE before the --"),
        ("-C", "give --config KEY=VALUE before the --"),
        ("--configfile", "give --configfile FILE before the --"),
        ("--directory", "give the results folder as --results"),
        ("-dout", "give the results folder as --results"),
        ("--snakefile", "snakembed run runs snakembed.s workflow; run another with snakemake"),
        ("--cores", "give --cores N before the --"),  # Snakemake waits for ever on --cores 0
    ],
)
def test_options_snakembed_sets_are_refused_after_the_double_dash(tmp_path, arg, fix):
    """Given again after --, Snakemake would take them in place of snakembed's own: a later
    --config drops the images and results, a later --configfile the user's config files."""
    with pytest.raises(ValueError, match=f"^{arg} after --: {fix}"):
        snakemake_command("p", snakemake_args=["--forceall", arg, "x"], base=tmp_path)
    snakemake_command("p", snakemake_args=["-np", "--jobs", "2", "--dry-run"], base=tmp_path)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--dir", "/tmp"], "--directory"),  # Snakemake reads unique abbreviations
        (["--di=/tmp"], "--directory"),
        (["--snake", "x"], "--snakefile"),
        (["-nCthreads=3"], "--config"),  # and short options grouped behind a flag
        (["-nd", "/tmp"], "--directory"),
        (["-pns", "x"], "--snakefile"),
    ],
)
def test_abbreviated_and_grouped_options_are_refused_as_snakemake_reads_them(
    tmp_path, args, option
):
    with pytest.raises(ValueError, match=f"after --: Snakemake reads {option} in it"):
        snakemake_command("p", snakemake_args=args, base=tmp_path)


def test_arguments_that_only_look_like_snakembeds_options_pass_through(tmp_path):
    """A rule name after -R (its letters include d and s) is not a group of short options."""
    cmd = snakemake_command(
        "p", snakemake_args=["-Rembed_classify_store", "--dry", "-kp"], base=tmp_path
    )
    assert cmd[-3:] == ["-Rembed_classify_store", "--dry", "-kp"]
