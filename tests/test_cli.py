"""The snakembed CLI: predict, embed, info, list; it shares the workflow's code path."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
import yaml
from conftest import folder_shard

import snakembed
from snakembed.cli import main


def test_embed_gives_the_stored_vector(workflow_run, capsys):
    image = workflow_run["images"] / "alpha" / "a2.png"
    assert main(["embed", str(image), "--configfile", str(workflow_run["config"]), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["image"] == str(image)
    stored = snakembed.open_store(workflow_run["results"]).lookup("alpha/a2.png").embedding
    assert np.allclose(np.array(line["embedding"], np.float32), stored, rtol=1e-5, atol=1e-5)


def test_embed_and_predict_with_results_compute_as_the_run_did(workflow_run, capsys):
    """--results R alone: the run's model, checkpoint, layer, preprocessing and precision give
    the stored vector, and its head the stored label, from any working directory."""
    image = workflow_run["images"] / "alpha" / "a2.png"
    results = str(workflow_run["results"])
    stored = snakembed.open_store(results).lookup("alpha/a2.png")
    assert main(["embed", str(image), "-r", results, "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert np.allclose(np.array(line["embedding"], np.float32), stored.embedding, atol=1e-5)
    assert main(["predict", str(image), "--results", results, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["label"] == stored.label


def test_a_checkpoint_changed_since_the_run_is_refused(workflow_run, capsys, tmp_path):
    """--results with a checkpoint rewritten since the run: its vectors would not be the
    stored ones' kind, so nothing is printed, and the error says what differs."""
    import shutil

    import h5py
    import torch
    import torchvision

    results = tmp_path / "results"
    shutil.copytree(workflow_run["results"], results)
    other = tmp_path / "other.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other)
    for path in (results / "embeddings").rglob("*.h5"):
        with h5py.File(path, "r+") as f:
            settings = json.loads(f.attrs["settings"])
            settings["model"]["weights"] = str(other)
            f.attrs["settings"] = json.dumps(settings)
    image = str(workflow_run["images"] / "alpha" / "a2.png")
    assert main(["embed", image, "-r", str(results)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"the checkpoint {other} changed since the run that wrote {results}" in captured.err
    assert "run the workflow again, or restore the file" in captured.err


def test_missing_images_exit_2_and_the_others_are_still_answered(workflow_run, capsys, tmp_path):
    good = str(workflow_run["images"] / "alpha" / "a1.jpg")
    missing = str(tmp_path / "typo.jpg")
    config = str(workflow_run["config"])
    assert main(["predict", good, missing, "--configfile", config, "--json"]) == 2
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.strip().splitlines()]
    assert lines[0]["image"] == good and "label" in lines[0]
    assert lines[1] == {"image": missing, "error": "no such file; check the path"}
    assert f"{missing}: no such file" in captured.err
    assert main(["embed", missing]) == 2  # nothing to embed: no model is loaded
    assert main(["embed", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["predict", "s3://photos/tree/a.jpg"]) == 2
    assert "read by runs only: snakembed run s3://BUCKET/PREFIX" in capsys.readouterr().err


def test_a_second_predict_uses_the_worker_the_first_started(
    workflow_run, workers, capsys, monkeypatch, tmp_path
):
    """predict leaves its worker waiting (worker.idle): the next call loads no model, and both
    print what computing in the command's own process prints (worker.enabled: false), each
    image by the name it was given, in that order."""
    monkeypatch.setattr(tempfile, "tempdir", str(workers.tmp))
    alpha = workflow_run["images"] / "alpha"
    images = [str(alpha / "a2.png"), str(alpha / "a1.jpg"), f"{alpha}/../alpha/a2.png"]
    config = str(workflow_run["config"])
    printed = []
    for _ in range(2):
        assert main(["predict", *images, "--configfile", config, "--json", "--topk", "3"]) == 0
        printed.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert workers.started() == 1 and workers.logs().count(" runs folder ") == 2
    # other classify settings, and embed, are answered by the same worker
    assert main(["predict", images[0], "--configfile", config, "--json", "--topk", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)["topk"]) == 2
    assert main(["embed", images[0], "--configfile", config]) == 0
    capsys.readouterr()
    assert workers.started() == 1 and workers.logs().count(" runs folder ") == 4
    # what was asked wrong comes back from the worker as one line, exit 2
    fake = tmp_path / "fake.npz"
    fake.write_text("not a head")
    assert main(["predict", images[0], "--configfile", config, "--head", str(fake)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(fake) in err and "Traceback" not in err
    here = yaml.safe_load(workflow_run["config"].read_text()) | {"worker": {"enabled": False}}
    (tmp_path / "here.yaml").write_text(yaml.safe_dump(here))
    argv = ["predict", *images, "--configfile", str(tmp_path / "here.yaml"), "--json"]
    assert main([*argv, "--topk", "3"]) == 0
    computed_here = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert workers.started() == 1
    assert [line["image"] for line in computed_here] == images  # in the order given
    assert computed_here[0]["topk"] == computed_here[2]["topk"]  # one file by two names
    for lines in printed:
        assert [line["image"] for line in lines] == images
        assert [line["label"] for line in lines] == [line["label"] for line in computed_here]
        for line, other in zip(lines, computed_here, strict=True):
            assert [t[0] for t in line["topk"]] == [t[0] for t in other["topk"]]
            assert np.allclose([t[1] for t in line["topk"]], [t[1] for t in other["topk"]])


def test_predict_json_lines_and_topk(workflow_run, capsys):
    images = [workflow_run["images"] / "alpha" / n for n in ("a1.jpg", "a3.jpeg")]
    code = main(
        [
            "predict",
            *map(str, images),
            "--configfile",
            str(workflow_run["config"]),
            "--topk",
            "2",
            "--json",
        ]
    )
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["image"] for x in lines] == [str(p) for p in images]
    store = snakembed.open_store(workflow_run["results"])
    for line, path in zip(lines, images, strict=True):
        assert set(line) == {"image", "label", "score", "topk"}
        assert len(line["topk"]) == 2 and line["topk"][0] == [line["label"], line["score"]]
        assert line["label"] == store["alpha"][path.name].label


def test_predict_reports_unreadable_images(workflow_run, capsys, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("no")
    good = workflow_run["images"] / "alpha" / "a1.jpg"
    code = main(
        ["predict", str(good), str(bad), "--configfile", str(workflow_run["config"]), "--json"]
    )
    assert code == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["image"] == str(good)
    assert lines[1] == {"image": str(bad), "error": lines[1]["error"]}
    assert "not an image" in lines[1]["error"]


def test_each_image_is_answered_where_and_as_often_as_it_was_given(workflow_run, capsys, tmp_path):
    """Answers and errors in the order given, a repeated image each time, errors by the name
    typed (stderr, and --json lines in their place)."""
    bad = tmp_path / "bad.jpg"
    bad.write_text("no")
    good = str(workflow_run["images"] / "alpha" / "a1.jpg")
    missing = str(tmp_path / "typo.jpg")
    asked = [good, missing, str(bad), good]
    config = str(workflow_run["config"])
    assert main(["predict", *asked, "--configfile", config, "--json"]) == 2
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.splitlines()]
    assert [line["image"] for line in lines] == asked
    assert [("error" in line) for line in lines] == [False, True, True, False]
    assert lines[0] == lines[3]
    errors = captured.err.splitlines()
    assert errors == [f"snakembed: {missing}: no such file; check the path", errors[1]]
    assert errors[1].startswith(f"snakembed: {bad}: not an image")
    assert main(["embed", good, good, "--configfile", config]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_predict_plain_output(workflow_run, capsys):
    image = workflow_run["images"] / "top.jpg"
    assert main(["predict", str(image), "--configfile", str(workflow_run["config"])]) == 0
    path, label, score = capsys.readouterr().out.strip().split("\t")
    assert path == str(image) and label and 0 < float(score) <= 1


def test_config_errors_name_the_key(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"batch_size": -1}))
    assert main(["embed", "x.jpg", "--configfile", str(config)]) == 2
    assert "batch_size" in capsys.readouterr().err
    config.write_text("model: [\n")
    assert main(["embed", "x.jpg", "--configfile", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"config file {config} is not valid YAML at line 2" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv", [["predict", "x.jpg", "--topk", "0"], ["query", "x.jpg", "--top", "-1"]]
)
def test_a_count_below_one_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "is not a whole number of at least 1" in capsys.readouterr().err


def test_what_a_command_does_not_take_is_refused_with_its_own_usage(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["predict", "x.jpg", "--top", "3"])  # --topk's beginning: not taken for it
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: snakembed predict") and "unrecognized arguments: --top 3" in err


def test_info(workflow_run, capsys):
    assert main(["info", "--results", str(workflow_run["results"])]) == 0
    out = capsys.readouterr().out
    n = sum(len(v) for v in workflow_run["folders"].values())
    assert f"folders: {len(workflow_run['folders'])}, images: {n}, failed: 3" in out
    assert "resnet18" in out and "failed: alpha/empty.jpg: empty file" in out
    assert "classify: pretrained (the model's own classifier)" in out.splitlines()


def test_info_after_a_run_stopped_part_way(workflow_run, capsys, tmp_path):
    """A killed run leaves a folder without its file and folders of two settings: info names
    both, and the folder still to compute, rather than failing or describing one."""
    import shutil

    import h5py

    from snakembed.layout import folder_file

    results = shutil.copytree(workflow_run["results"], tmp_path / "results")
    first, second, *_ = sorted(workflow_run["folders"])
    folder_file(results, first).unlink()
    with h5py.File(folder_file(results, second), "r+") as f:
        f.attrs["layer"] = "layer3"
    assert main(["info", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    n = len(workflow_run["folders"])
    assert f"folders: {n}, images: " in out and ", pending: 1" in out
    shard_log = results / "logs" / "embed_classify_store" / f"{folder_shard(results, first)}.log"
    pending = f"  {first}: pending (no file yet; log: {shard_log}); run the workflow to compute it"
    assert pending in out
    assert "index.h5 is behind the folder files" in out
    models = [line for line in out.splitlines() if line.startswith("model: ")]
    assert len(models) == 2 and any(
        f"layer layer3 (pool avg), 512-d, fp32 on cpu (1 of {n - 1} folders)" in m for m in models
    )
    assert any(
        f"layer pre_logits (pool avg), 512-d, fp32 on cpu ({n - 2} of {n - 1} folders)" in m
        for m in models
    )
    # and each folder names its own setting
    assert any(
        line.startswith(f"  {second}: ") and "layer layer3" in line for line in out.splitlines()
    )


def test_every_command_takes_the_results_folder_the_same_way(
    workflow_run, capsys, monkeypatch, tmp_path
):
    """--results R everywhere, default ./results; a positional results folder is refused."""
    monkeypatch.chdir(workflow_run["base"])  # holds results/
    image = str(workflow_run["images"] / "alpha" / "a1.jpg")
    export = ["export", "--format", "npz", "-o", str(tmp_path / "e.npz")]
    for argv in (["info"], ["query", image, "--top", "1"], export):
        assert main(argv) == 0, argv
    for command in ("predict", "embed"):  # explicitly: without it they use the config's model
        assert main([command, image, "-r", "results"]) == 0
    out = capsys.readouterr().out
    assert "alpha/a1.jpg" in out and f"folders: {len(workflow_run['folders'])}" in out
    with pytest.raises(SystemExit) as exit_:
        main(["info", "results"])
    assert exit_.value.code == 2
    assert "give the results folder as --results results" in capsys.readouterr().err
    assert (tmp_path / "e.npz").is_file()


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert main(["info", "--results", missing]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("snakembed: error: ") and missing in err
    assert "Traceback" not in err
    with pytest.raises(OSError, match="nowhere"):
        main(["--debug", "info", "--results", missing])
    with pytest.raises(OSError, match="nowhere"):
        main(["info", "--results", missing, "--debug"])
    assert main(["layers", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_model" in err and "resnet50" in err


def test_unexpected_errors_exit_1_and_point_to_debug(monkeypatch, capsys):
    from snakembed import cli

    def broken(args):
        raise RuntimeError("out of\nluck")

    monkeypatch.setattr(cli, "_list", broken)
    assert main(["list"]) == 1
    assert capsys.readouterr().err == (
        "snakembed: error: RuntimeError: out of; luck (snakembed --debug shows where)\n"
    )


def test_version_and_config(capsys):
    from snakembed.config import validate_config

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"snakembed {snakembed.__version__}\n"
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text) == validate_config({})
    lines = text.splitlines()
    for i, line in enumerate(lines):  # every key comes under its description
        if line.strip() and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), line


def test_arguments_after_a_double_dash_are_only_for_run(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["info", "--", "--forceall"])
    assert exit_.value.code == 2
    assert "only `snakembed run`" in capsys.readouterr().err


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in ("efficientnet_lite0", "resnet50", "timm/convnext_tiny", "pretrained"):
        assert f"  {name}" in lines


def test_layers_lists_what_model_layer_accepts(capsys):
    from snakembed.backbones import create_backbone

    assert main(["layers", "mobilenet_v3_small"]) == 0
    names = capsys.readouterr().out.splitlines()
    assert names[0] == "pre_logits" and "features.5" in names and "x" not in names
    for name in (names[1], names[len(names) // 2], "features.5"):  # every one is usable
        assert create_backbone("mobilenet_v3_small", "none", name).embedding_dim > 0


def test_a_bad_row_index_is_an_index_error_not_a_broken_file(workflow_run):
    with snakembed.open_store(workflow_run["results"])["alpha"] as folder:
        assert folder.row(0)[0] == folder.ids()[0]
        with pytest.raises(IndexError, match="row 99 of 'alpha'"):
            folder.row(99)
        with pytest.raises(TypeError):
            folder.row("a1.jpg")


def test_run_without_images_says_where_they_went(tmp_path, capsys, monkeypatch):
    """--config takes every value up to the next option: IMAGES given after it is one of them."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--config", "threads=3", "photos"]) == 2
    err = capsys.readouterr().err
    assert "needs IMAGES" in err and "--config took 'photos': give IMAGES before --config" in err
    assert main(["run"]) == 2
    assert "needs IMAGES, the root of your images\n" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "photos", "--unlock"])
    err = capsys.readouterr().err
    assert "Snakemake's own options go after --: snakembed run IMAGES -- --unlock" in err


def test_run_refuses_a_bad_configuration_in_one_line_before_snakemake(
    tmp_path, capsys, monkeypatch
):
    import subprocess

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    monkeypatch.setattr(subprocess, "Popen", None)  # Snakemake must not start
    assert main(["run", "photos", "--config", "batch_size=-3", "modle=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("snakembed: error: invalid configuration: config key 'modle' is unknown")
    assert "did you mean 'model'?; config key 'batch_size': -3 is less than" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no results folder


def test_info_lists_folders_one_by_one_only_for_a_small_tree_or_when_asked(
    workflow_run, capsys, monkeypatch, tmp_path
):
    import shutil

    import snakembed.cli
    from snakembed.layout import folder_file

    results = shutil.copytree(workflow_run["results"], tmp_path / "results")
    first = sorted(workflow_run["folders"])[0]
    folder_file(results, first).unlink()  # pending
    monkeypatch.setattr(snakembed.cli, "_LISTED", 1)
    assert main(["info", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    n = len(workflow_run["folders"])
    assert f"  {first}: pending (no file yet" in out  # pending folders are named
    assert f"  ({n - 1} folders done: --folders lists each)" in out
    assert not [line for line in out.splitlines() if " failed" in line and line.startswith("  ")]
    assert main(["info", "--results", str(results), "--folders"]) == 0
    every = capsys.readouterr().out
    assert all(f"  {key}: " in every for key in workflow_run["folders"])
