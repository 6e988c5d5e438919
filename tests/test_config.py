"""The configuration: defaults from the schema, errors that name the key, plan checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_image

from snakembed.config import ConfigError, load_config, numbers_fingerprint, validate_config
from snakembed.plan import plan_run


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
        "layer": "pre_logits",
    }
    assert config["images"] == "demo/images" and config["classify"]["head"] == "pretrained"


def test_the_shipped_config_is_the_defaults():
    shipped = load_config(REPO / "config.yaml")
    assert shipped == validate_config({})


@pytest.mark.parametrize(
    "override,key",
    [
        ({"batch_size": -1}, "batch_size"),
        ({"device": "tpu"}, "device"),
        ({"patches": {"border": "wrap"}}, "patches.border"),
        ({"model": {"nmae": "resnet18"}}, "model"),
        ({"preprocess": {"mean": [0.5]}}, "preprocess.mean"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate_config(override)


def test_fingerprint_changes_with_what_changes_the_numbers():
    base = numbers_fingerprint(validate_config({}))
    assert numbers_fingerprint(validate_config({}))["hash"] == base["hash"]
    for override in (
        {"model": {"name": "resnet18"}},
        {"preprocess": {"resize": 300}},
        {"patches": {"enabled": True}},
    ):
        assert numbers_fingerprint(validate_config(override))["hash"] != base["hash"]
    # the batch size and the head do not change the embeddings
    assert numbers_fingerprint(validate_config({"batch_size": 7}))["hash"] == base["hash"]
    assert numbers_fingerprint(validate_config({"classify": {"topk": 2}}))["hash"] == base["hash"]


def _config(tmp_path: Path, **overrides) -> dict:
    make_image(tmp_path / "images" / "a" / "x.jpg")
    return {"images": str(tmp_path / "images"), "results": str(tmp_path / "results"), **overrides}


def test_plan_finds_folders(tmp_path):
    plan = plan_run(_config(tmp_path))
    assert plan.folders == {"a": ["x.jpg"]} and plan.stems == {"a": "a"}


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"model": {"name": "nope"}}, "model.name"),
        ({"classify": {"head": "nope"}}, "classify.head"),
        ({"model": {"name": "resnet18", "weights": "/no/such.pth"}}, "does not exist"),
    ],
)
def test_plan_refuses_what_cannot_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_run(_config(tmp_path, **overrides))


def test_plan_allows_no_classification(tmp_path):
    plan_run(_config(tmp_path, classify={"head": "none"}))


def test_conda_environment_is_in_step_with_pyproject():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "envs" / "snakembed.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(d for d in pip if not d.startswith("-")) == sorted(project["dependencies"])
