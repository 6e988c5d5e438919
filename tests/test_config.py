"""The configuration: defaults from the schema, errors that name the key, plan checks."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, machine_compute, make_image

from snakembed.config import ConfigError, load_config, numbers_fingerprint, validate_config
from snakembed.plan import plan_run
from snakembed.shards import read_shard_manifest, shard_name, shard_of


def test_every_schema_key_has_a_description_and_a_default():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())

    def walk(props, prefix=""):
        for key, sub in props.items():
            assert "description" in sub, f"{prefix}{key} has no description"
            assert "default" in sub, f"{prefix}{key} has no default"
            walk(sub.get("properties", {}), f"{prefix}{key}.")

    walk(schema["properties"])


def test_defaults_fill_an_empty_config():
    config = validate_config({})
    assert config["model"] == {
        "name": "efficientnet_lite0",
        "weights": "default",
        "module": None,
        "kwargs": {},
        "layer": "pre_logits",
        "pool": "avg",
    }
    assert config["images"] == "demo/images" and config["classify"]["head"] == "pretrained"


def test_the_shipped_config_is_the_defaults():
    shipped = load_config(REPO / "config.yaml")
    assert shipped == validate_config({})


@pytest.mark.parametrize(
    "override,key,value,allowed",
    [
        ({"batch_size": -1}, "batch_size", "-1", "minimum of 1"),
        ({"device": "tpu"}, "device", "'tpu'", "`cpu`, `cuda`, `cuda:N` or `mps`"),
        ({"patches": {"border": "wrap"}}, "patches.border", "'wrap'", "'drop', 'pad', 'shift'"),
        ({"model": {"nmae": "resnet18"}}, "model.nmae", "unknown", "did you mean 'name'?"),
        ({"treads": 2}, "treads", "unknown", "did you mean 'threads'?"),
        ({"model.name": "x"}, "model.name", "unknown", "inside its section, as model: {name:"),
        ({"zzz": 1}, "zzz", "unknown", "known keys here: batch_size, change_detection"),
        ({"pool": "max"}, "pool", "unknown", "it belongs in model, as model: {pool: VALUE}"),
        ({"weights": "x"}, "weights", "unknown", "belongs in model or finetune, as model: {"),
        ({"worker": False}, "worker", "False", "not a section: give worker: {enabled: false}"),
        ({"classify": "none"}, "classify", "'none'", "not a section: give classify: {head: none}"),
        ({"model": {"name:resnet18": None}}, "model.name:resnet18", "unknown", "put a space"),
        ({"threads": float("nan")}, "threads", "nan", "is not of type 'integer' ("),
        ({"batch_size": 1.5}, "batch_size", "1.5", "use auto or an integer of at least 1"),
        ({"worker": {"idle": float("nan")}}, "worker.idle", "nan", "give a finite one"),
        ({"classify": {"weight_decay": "inf"}}, "classify.weight_decay", "inf", "a finite"),
        ({"preprocess": {"mean": [0.5]}}, "preprocess.mean", r"\[0.5\]", "too short"),
        ({"max_pixels": 0}, "max_pixels", "0", "minimum of 1"),
        ({"batch_size": "big"}, "batch_size", "'big'", "use auto or an integer of at least 1"),
        ({"decode": "nvjpeg"}, "decode", "'nvjpeg'", "'auto', 'pillow', 'torchvision'"),
        ({"worker": {"shared": "nope"}}, "worker.shared", "'nope'", "use auto, true or false"),
        ({"worker": {"services": 0}}, "worker.services", "0", "minimum of 1"),
        ({"worker.idel": 3}, "worker.idel", "unknown", "as worker: {idle: VALUE}"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(override, key, value, allowed):
    with pytest.raises(ConfigError) as error:
        validate_config(override)
    line = next(x for x in str(error.value).splitlines() if f"'{key}'" in x)
    assert re.search(value, line) and allowed in line


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        validate_config({"batch_size": 0, "device": "gpu", "threads": -2})
    assert all(f"'{k}'" in str(error.value) for k in ("batch_size", "device", "threads"))


def test_what_only_a_custom_network_uses_is_ignored_for_another(tmp_path):
    """Left from a config file when --config picks another network, module and kwargs change
    nothing, so they neither stop the run nor change the settings (nothing recomputed)."""
    from snakembed.config import unused_model_keys

    model = {"name": "resnet18", "module": "nets:Net", "kwargs": {"width": 8}}
    assert unused_model_keys({"model": model}) == ["model.module", "model.kwargs"]
    assert unused_model_keys({"model": {**model, "name": "custom"}}) == []
    config = validate_config({"model": dict(model)})
    assert config == validate_config({"model": {"name": "resnet18"}})
    kept = validate_config({"model": {**model, "name": "custom"}})["model"]
    assert kept["module"] == "nets:Net" and kept["kwargs"] == {"width": 8}


def test_an_empty_section_takes_its_defaults():
    """A section whose keys are all commented out is YAML null."""
    assert validate_config({"report": None, "model": {"kwargs": None}}) == validate_config({})


def test_a_bad_value_is_named_once():
    with pytest.raises(ConfigError) as error:
        validate_config({"threads": float("nan")})  # not an integer, and not finite
    assert str(error.value).count("'threads'") == 1


def test_command_line_words_become_the_types_the_schema_asks_for():
    """`--config` gives 'true', 'null' and nested numbers as strings."""
    config = validate_config(
        {
            "follow_external_links": "true",
            "max_pixels": "null",
            "patches": {"enabled": "True", "size": "32"},
            "preprocess": {"mean": ["0.1", "0.2", "0.3"]},
            "classify": {"head": "none"},
            "model": {
                "name": "custom",
                "module": "nets:Net",
                "kwargs": {"width": "64", "bias": "false", "act": "relu", "p": "0.5", "n": ["1"]},
            },
        }
    )
    kwargs = {"width": 64, "bias": False, "act": "relu", "p": 0.5, "n": [1]}  # lists too
    assert config["model"]["kwargs"] == kwargs
    assert config["follow_external_links"] is True and config["max_pixels"] is None
    assert config["patches"]["enabled"] is True and config["patches"]["size"] == 32
    assert config["preprocess"]["mean"] == [0.1, 0.2, 0.3]
    assert config["classify"]["head"] == "none"  # a string key keeps the word
    # YAML's other ways of writing null, inside a mapping that --config gives as strings
    nulls = validate_config({"preprocess": {"resize": "~", "crop": ""}})["preprocess"]
    assert nulls["resize"] is None and nulls["crop"] is None
    with pytest.raises(ConfigError, match="'batch_size': 'many'"):
        validate_config({"batch_size": "many"})


def test_a_whole_number_written_as_a_float_is_the_same_setting():
    """Settings decide what is recomputed: max_pixels=1e8 must not differ from 100000000."""
    written = validate_config({"max_pixels": 1e8, "threads": 2.0, "patches": {"size": 32.0}})
    plain = validate_config({"max_pixels": 100000000, "threads": 2, "patches": {"size": 32}})
    assert written == plain and type(written["max_pixels"]) is int
    assert json.dumps(written, sort_keys=True) == json.dumps(plain, sort_keys=True)
    assert type(validate_config({"finetune": {"lr": 1.0}})["finetune"]["lr"]) is float
    # and as --config gives a nested one: as text
    assert validate_config({"patches": {"resize": "448.0"}})["patches"]["resize"] == 448


def test_fingerprint_changes_with_what_changes_the_numbers():
    cpu = {"device": "cpu", "precision": "fp32"}
    base = numbers_fingerprint(validate_config(cpu))
    assert numbers_fingerprint(validate_config(cpu))["hash"] == base["hash"]
    for override in (
        {"model": {"name": "resnet18"}},
        {"preprocess": {"resize": 300}},
        {"patches": {"enabled": True}},
        {"precision": "bf16"},
        {"decode": "torchvision"},
    ):
        changed = numbers_fingerprint(validate_config({**cpu, **override}))
        assert changed["hash"] != base["hash"], override
    for override in ({"device": "cuda"}, {"device": "cuda:1", "precision": "fp32"}):
        assert numbers_fingerprint(validate_config(override))["hash"] != base["hash"], override
    # auto counts as what it resolves to on this machine (cuda, bf16 and torchvision's decoder
    # where torch sees a GPU, else cpu, Pillow, and bf16 where the CPU has AMX or fp32),
    # and which GPU computes does not change the numbers
    auto = numbers_fingerprint(validate_config({}))
    assert numbers_fingerprint(validate_config(machine_compute()))["hash"] == auto["hash"]
    cuda = numbers_fingerprint(validate_config({"device": "cuda"}))
    assert numbers_fingerprint(validate_config({"device": "cuda:1"}))["hash"] == cuda["hash"]
    assert cuda["hash"] != base["hash"]
    # the batch size and the head do not change the embeddings
    for override in ({"batch_size": 7}, {"classify": {"topk": 2}}):
        same = numbers_fingerprint(validate_config({**cpu, **override}))
        assert same["hash"] == base["hash"], override


def _config(tmp_path: Path, **overrides) -> dict:
    make_image(tmp_path / "images" / "a" / "x.jpg")
    return {"images": str(tmp_path / "images"), "results": str(tmp_path / "results"), **overrides}


def test_plan_finds_folders(tmp_path):
    plan = plan_run(_config(tmp_path))
    assert plan.folders == {"a": ["x.jpg"]} and plan.stems == {"a": "a"}
    assert plan.shards == {"1-of-1": ["a"]}
    assert plan.manifest_file("1-of-1") == tmp_path / "results" / "manifests" / "1-of-1.json"


def _apart(*keys: str) -> int:
    """A shard count that puts each of ``keys`` in a shard of its own."""
    return next(n for n in range(2, 64) if len({shard_of(k, n) for k in keys}) == len(keys))


def test_manifests_are_rewritten_only_where_images_changed(tmp_path):
    count = _apart("a", "b{x}")
    config = _config(tmp_path, shards={"count": count})
    make_image(tmp_path / "images" / "b{x}" / "{y}.jpg")
    assert plan_run(dict(config)).write_manifests() == 2
    assert plan_run(dict(config)).write_manifests() == 0  # nothing changed: nothing written
    plan = plan_run(dict(config))
    shard = {key: shard_name(shard_of(key, count), count) for key in ("a", "b{x}")}
    first = {s: plan.manifest_file(s).stat().st_mtime_ns for s in plan.shards}

    # a brace in a name is just a name in a manifest; rewriting the image rewrites its shard's
    path = make_image(tmp_path / "images" / "b{x}" / "{y}.jpg", seed=3, size=(40, 30))
    os.utime(path, ns=(1, 1))
    assert plan_run(dict(config)).write_manifests() == 1
    manifest = read_shard_manifest(plan.manifest_file(shard["b{x}"]))
    info = path.stat()
    assert list(manifest.folders) == ["b{x}"]
    assert manifest.folders["b{x}"]["images"] == {
        "{y}.jpg": [info.st_size, 1, info.st_ino, info.st_ctime_ns]
    }
    assert plan.manifest_file(shard["a"]).stat().st_mtime_ns == first[shard["a"]]

    # an image added, or one that cannot be read, is a change too
    make_image(tmp_path / "images" / "a" / "new.jpg")
    (tmp_path / "images" / "a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    assert plan_run(dict(config)).write_manifests() == 1
    folder = read_shard_manifest(plan.manifest_file(shard["a"])).folders["a"]
    assert sorted(folder["images"]) == ["new.jpg", "x.jpg"]
    assert "broken symbolic link" in folder["refused"]["gone.jpg"]


def test_a_damaged_manifest_names_itself_and_the_fix(tmp_path):
    path = tmp_path / "1-of-1.json"
    path.write_text("{")
    with pytest.raises(ValueError, match=r"1-of-1\.json: not a shard manifest.*delete it"):
        read_shard_manifest(path)


def test_a_cluster_jobs_plan_reads_the_manifests_not_the_tree(tmp_path):
    config = _config(tmp_path, shards={"count": _apart("a", "b{x}/deep", "gone")})
    make_image(tmp_path / "images" / "b{x}" / "deep" / "y.jpg")
    make_image(tmp_path / "images" / "b{x}" / "deep" / "z.jpg")
    make_image(tmp_path / "images" / "gone" / "y.jpg")
    plan_run(dict(config)).write_manifests()
    assert len(list((tmp_path / "results" / "manifests").iterdir())) == 3
    shutil.rmtree(tmp_path / "images" / "gone")
    main = plan_run(dict(config))
    main.write_manifests()  # the folder that is gone takes its shard's manifest with it
    assert len(list((tmp_path / "results" / "manifests").iterdir())) == 2

    # a folder that appears after planning is not this run's: the job's plan does not see it
    make_image(tmp_path / "images" / "later" / "y.jpg")
    job = plan_run(dict(config), discover=False)
    assert {s: job.shards[s] for s in job.shards} == dict(main.shards)
    assert sorted(key for keys in job.shards.values() for key in keys) == ["a", "b{x}/deep"]
    assert [job.image_count(s) for s in job.shards] == [main.image_count(s) for s in main.shards]
    assert sorted(job.image_count(s) for s in job.shards) == [1, 2]
    assert job.warnings() == []
    with pytest.raises(RuntimeError, match="manifests"):
        _ = job.folders


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"model": {"name": "nope"}}, "'model.name': unknown backbone 'nope'.*torchvision"),
        ({"classify": {"head": "nope"}}, "unknown head 'nope'.*pretrained, or none for embeddings"),
        (
            {"model": {"name": "resnet18", "weights": "/no/such.pth"}},
            "'model.weights'.*'/no/such.pth' does not exist",
        ),
        (
            {"patches": {"enabled": True, "resize": 100, "size": 224, "border": "drop"}},
            "'patches.size': 224 is larger than patches.resize .100. with border: drop",
        ),
        ({"preprocess": {"resize": 100, "crop": 224}}, "'preprocess.crop': 224 is larger"),
        ({"results": "out/{run}"}, "'results'.*brace"),
    ],
)
def test_plan_refuses_what_cannot_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_run(_config(tmp_path, **overrides))


@pytest.mark.parametrize(
    "images,message",
    [
        ("missing", "does not exist"),
        ("empty", "no image files"),
        ("with_results", "lies inside the image root"),
    ],
)
def test_plan_refuses_an_unusable_tree(tmp_path, images, message):
    from snakembed.plan import DiscoveryError

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    make_image(tmp_path / "with_results" / "a" / "x.jpg")
    results = tmp_path / "with_results" / "results" if images == "with_results" else "results"
    with pytest.raises(DiscoveryError, match=message):
        plan_run({"images": str(tmp_path / images), "results": str(results)})


def test_two_folders_that_would_share_a_file_are_named(tmp_path):
    from snakembed.plan import DiscoveryError

    make_image(tmp_path / "images" / "x{1}" / "a.jpg")
    make_image(tmp_path / "images" / "x%7B1}" / "a.jpg")
    with pytest.raises(DiscoveryError, match=r"folders 'x%7B1}' and 'x\{1}'|'x\{1}' and 'x%7B1}'"):
        plan_run({"images": str(tmp_path / "images"), "results": str(tmp_path / "results")})


def test_plan_allows_patches_that_pad_or_shift(tmp_path):
    hashes = set()
    for border in ("pad", "shift"):
        patches = {"enabled": True, "resize": 100, "size": 224, "border": border}
        plan = plan_run(_config(tmp_path, patches=patches))
        assert plan.stems == {"a": "a"} and plan.numbers["patches"]["border"] == border
        hashes.add(plan.numbers["hash"])
    assert len(hashes) == 2  # another border reruns every folder


def test_plan_allows_no_classification(tmp_path):
    config = _config(tmp_path, classify={"head": "none"})
    plan = plan_run(config)
    assert plan.stems == {"a": "a"} and plan.labelled is None
    assert config["classify"] == {**validate_config({})["classify"], "head": "none"}


def test_the_plan_resolves_device_precision_and_decoder_once_for_the_run(tmp_path, monkeypatch):
    """auto is what it resolves to where the run is planned; jobs that ask a cluster for a GPU
    get cuda, bf16 and the device's JPEG decoder; a cluster job's own Snakemake takes what the
    planning process chose."""
    auto = _config(tmp_path)
    plan = plan_run(auto)
    machine = machine_compute()  # what torch says of this machine
    assert {key: auto[key] for key in machine} == machine
    assert plan.compute["configured"] == {
        "device": "auto",
        "precision": "auto",
        "decode": "auto",
        "compile": "auto",
    }
    assert plan.compute["compile"] is False  # a tree of one image, on a CPU or a GPU
    explicit = plan_run(_config(tmp_path, **machine))
    assert explicit.numbers["hash"] == plan.numbers["hash"]

    gpu = _config(tmp_path)
    on_gpu = plan_run(gpu, gpu_jobs=True)
    assert (gpu["device"], gpu["precision"], gpu["decode"]) == ("cuda", "bf16", "torchvision")
    cpu = plan_run(_config(tmp_path, device="cpu"))
    assert on_gpu.numbers["hash"] != cpu.numbers["hash"]
    assert (on_gpu.numbers["device"], on_gpu.numbers["precision"]) == ("cuda", "bf16")
    on_gpu.write_manifests()
    job = _config(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a node that sees no GPU
    plan_run(job, discover=False)  # and no resources asked for
    assert (job["device"], job["precision"], job["decode"]) == ("cuda", "bf16", "torchvision")
    bf16 = _config(tmp_path, precision="bf16")
    assert plan_run(bf16, discover=False).compute["precision"] == "bf16"  # other settings


def test_a_plan_names_the_results_of_folders_that_are_gone(tmp_path):
    config = _config(tmp_path)
    make_image(tmp_path / "images" / "b" / "deep" / "y.jpg")
    results = tmp_path / "results"
    kept = [
        results / "embeddings" / "a.h5",
        results / "logs" / "embed_classify_store" / "1-of-1.log",
        results / "shards" / "1-of-1.json",
        results / "shards" / "1-of-1.json.old",
    ]
    gone = [
        results / "embeddings" / "old.h5",
        results / "embeddings" / "b" / ".c.h5.123.tmp",
        results / "embeddings" / "b" / "c.h5",
        results / "embeddings" / ".a.h5.stale",  # an earlier version's moved-aside file
        results / "logs" / "embed_classify_store" / "a.log",  # an earlier version's, per folder
        results / "logs" / "embed_classify_store" / "2-of-2.log",  # a shard of another count
        results / "shards" / "2-of-2.json",
        results / "shards" / "2-of-2.json.old",
        results / "benchmarks" / "embed_classify_store" / "b" / "c.tsv",
    ]
    others = [results / "embeddings" / "notes.txt", results / "logs" / "index.log"]
    for path in [*kept, *gone, *others]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    plan = plan_run(config)
    assert sorted(plan.stale_files()) == sorted(gone)
    assert sorted(plan.prune()) == sorted(gone)
    assert all(p.exists() for p in [*kept, *others]) and not any(p.exists() for p in gone)
    assert not (results / "benchmarks" / "embed_classify_store" / "b").exists()
    assert not (results / "embeddings" / "b").exists()  # left empty


def test_conda_environment_is_in_step_with_pyproject():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "envs" / "snakembed.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(d for d in pip if not d.startswith("-")) == sorted(project["dependencies"])


def test_a_gpu_asked_for_where_the_jobs_find_none_is_warned_at_planning(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # this machine: no GPU
    lines = plan_run(_config(tmp_path, device="cuda")).warnings()
    assert any("torch sees no GPU" in line and "--config device=cpu" in line for line in lines)
    # jobs that ask a cluster for a GPU will have one; the CPU is not warned about
    assert not any("GPU" in line for line in plan_run(_config(tmp_path), gpu_jobs=True).warnings())
    assert not any("GPU" in line for line in plan_run(_config(tmp_path, device="cpu")).warnings())
