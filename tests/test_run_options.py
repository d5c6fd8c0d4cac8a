"""One typed run model for every verb: RunOptions, the legacy shim, the CLI's option group, typed contexts."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from tswitch_ray.cli import app, run_options
from tswitch_ray.demo import DemoOptions
from tswitch_ray.distributed.build import BuildConfig, ShardContext
from tswitch_ray.distributed.eval_runner import EvalContext
from tswitch_ray.distributed.executor import LocalExecutor, make_executor
from tswitch_ray.distributed.merge import MergeConfig, MergeContext
from tswitch_ray.errors import ConfigError
from tswitch_ray.eval.config import EvalConfig, load_eval_config
from tswitch_ray.options import (
    REDACTED,
    RUN_FIELDS,
    RunOptions,
    WithRunOptions,
    redact_uri,
    redacted,
)

SECRETS = {"key": "AKIDSENTINEL", "secret": "SECRETSENTINEL",
           "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "aws_secret_access_key": "NESTEDSENTINEL"}}
CONFIGS = [BuildConfig, MergeConfig, EvalConfig, DemoOptions]
REQUIRED = {BuildConfig: {"zoo": "z.yaml", "out": "o"}, MergeConfig: {"zoo": "z.yaml", "method": "ta", "out": "o"},
            EvalConfig: {"zoo": "z.yaml"}, DemoOptions: {}}


def _no_secret(text: str) -> None:
    for value in ("AKIDSENTINEL", "SECRETSENTINEL", "NESTEDSENTINEL"):
        assert value not in text, f"{value} leaked into: {text}"


# --- RunOptions ----------------------------------------------------------------------------------------

def test_every_dump_of_run_options_redacts_credentials_but_the_object_keeps_them():
    run = RunOptions(executor="local", storage_options=SECRETS)
    for text in (run.model_dump_json(), json.dumps(run.model_dump()), repr(run), str(run)):
        _no_secret(text)
    dumped = run.model_dump()["storage_options"]
    assert dumped["key"] == dumped["secret"] == dumped["client_kwargs"]["aws_secret_access_key"] == REDACTED
    assert dumped["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"  # not a secret: kept
    assert run.storage_options == SECRETS  # what the job opens its files with
    assert pickle.loads(pickle.dumps(run)).storage_options == SECRETS  # what a Ray task receives


def test_uri_passwords_are_redacted():
    assert redact_uri("https://alice:hunter2@mlflow.example:5000/x") == "https://alice:***@mlflow.example:5000/x"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redacted({"endpoint_url": "http://u:pw@h:1", "anon": False, "token": ""}) == \
        {"endpoint_url": "http://u:***@h:1", "anon": False, "token": ""}
    run = RunOptions(ray_address="ray://bob:SECRETSENTINEL@head:10001")
    _no_secret(run.model_dump_json() + repr(run))
    assert run.ray_address == "ray://bob:SECRETSENTINEL@head:10001"


def test_run_options_are_frozen_hashable_and_keyed_by_their_real_values():
    a, b = RunOptions(storage_options=SECRETS), RunOptions(storage_options=json.loads(json.dumps(SECRETS)))
    assert a == b and hash(a) == hash(b) and a.cache_key == b.cache_key
    other = RunOptions(storage_options={**SECRETS, "secret": "another"})
    assert a.cache_key != other.cache_key  # other credentials may open another filesystem: another cache entry
    _no_secret(a.cache_key)
    with pytest.raises(ValidationError):
        a.executor = "local"  # type: ignore[misc]


def test_invalid_run_options_name_the_field_and_never_echo_the_input():
    with pytest.raises(ValidationError) as ei:
        RunOptions(executor="SECRETSENTINEL")
    assert "executor" in str(ei.value)
    _no_secret(str(ei.value))
    with pytest.raises(ValidationError) as ei:
        BuildConfig(zoo="z", out="o", storage_options="key=SECRETSENTINEL")
    assert "run.storage_options" in str(ei.value).replace("\n", " ")
    _no_secret(str(ei.value))


def test_explicit_holds_only_what_was_given():
    assert RunOptions().explicit() == {}
    run = RunOptions(num_workers=3, storage_options={"anon": True})
    assert run.explicit() == {"num_workers": 3, "storage_options": {"anon": True}}


def test_make_executor_takes_run_options():
    assert isinstance(make_executor(RunOptions(executor="local")), LocalExecutor)


# --- the configs: one `run`, flat legacy fields lifted into it -------------------------------------------

def test_the_readme_build_config_still_works():
    cfg = BuildConfig(zoo="zoo.yaml", out="out/switches", alphas=[0.6, 0.9])
    assert cfg.run == RunOptions() and cfg.alphas == [0.6, 0.9]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_flat_legacy_fields_land_in_run(config):
    assert issubclass(config, WithRunOptions)  # one validator for all, not a copy per config
    flat = {"executor": "local", "ray_address": "auto", "num_workers": 2, "num_gpus": 0.5, "max_in_flight": 4,
            "storage_options": SECRETS, "show_progress": False}
    assert set(flat) == set(RUN_FIELDS)
    cfg = config(**REQUIRED[config], **flat)
    assert cfg.run == RunOptions(**flat)
    assert not set(RUN_FIELDS) & set(type(cfg).model_fields)  # no flat copy of a run field remains
    assert config(**REQUIRED[config], run=RunOptions(**flat)).run == cfg.run
    assert config(**REQUIRED[config], run=RunOptions(executor="local"), num_workers=2).run == \
        RunOptions(executor="local", num_workers=2)
    _no_secret(cfg.model_dump_json())


def test_a_run_field_given_twice_is_an_error_naming_it():
    with pytest.raises(ValidationError, match="executor given both"):
        BuildConfig(zoo="z", out="o", executor="local", run={"executor": "ray"})


def test_demo_options_dump_is_redacted():
    opts = DemoOptions(root="/tmp/demo", run=RunOptions(executor="local", storage_options=SECRETS))
    _no_secret(opts.model_dump_json() + repr(opts) + json.dumps(opts.model_dump()))
    assert opts.run.storage_options == SECRETS


def _write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_eval_yaml_takes_run_options_flat_or_under_run_and_cli_overrides_merge(tmp_path):
    flat = _write(tmp_path / "flat.yaml", {"zoo": "z.yaml", "executor": "local", "num_workers": 2,
                                           "storage_options": {"anon": True}})
    nested = _write(tmp_path / "nested.yaml", {"zoo": "z.yaml", "run": {"executor": "local", "num_workers": 2,
                                                                        "storage_options": {"anon": True}}})
    expected = RunOptions(executor="local", num_workers=2, storage_options={"anon": True})
    assert load_eval_config(flat).run == load_eval_config(nested).run == expected
    # An override names only what it changes; the config keeps the rest.
    cfg = load_eval_config(nested, {"run": RunOptions(num_workers=5).explicit()})
    assert cfg.run == RunOptions(executor="local", num_workers=5, storage_options={"anon": True})
    cfg = load_eval_config(flat, {"executor": "ray", "work_dir": None})  # the old flat override form
    assert cfg.run.executor == "ray" and cfg.run.num_workers == 2
    both = _write(tmp_path / "both.yaml", {"zoo": "z.yaml", "executor": "local", "run": {"executor": "ray"}})
    with pytest.raises(ConfigError, match=re.escape(both)):
        load_eval_config(both)


def test_eval_config_dump_is_redacted(tmp_path):
    path = _write(tmp_path / "c.yaml", {"zoo": "z.yaml", "storage_options": SECRETS,
                                        "tracking": {"uri": "https://u:SECRETSENTINEL@mlflow:5000"}})
    cfg = load_eval_config(path)
    _no_secret(cfg.model_dump_json(indent=2))  # what work_dir/config.json and the MLflow artifact hold
    assert cfg.run.storage_options == SECRETS and "SECRETSENTINEL" in cfg.tracking.uri


def test_an_invalid_eval_config_never_echoes_credentials(tmp_path):
    path = _write(tmp_path / "c.yaml", {"zoo": "z.yaml", "run": {"executor": "nope", "storage_options": "SECRETSENTINEL"}})
    with pytest.raises(ConfigError) as ei:
        load_eval_config(path)
    assert "run.executor" in str(ei.value) and "run.storage_options" in str(ei.value)
    _no_secret(str(ei.value))


# --- typed task contexts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("context", [ShardContext, MergeContext, EvalContext], ids=lambda c: c.__name__)
def test_task_contexts_hold_typed_fields_not_json(context):
    fields = {f.name: f.type for f in dataclasses.fields(context)}
    assert context.__dataclass_params__.frozen
    assert not [n for n in fields if n.endswith("_json")]
    assert fields["run"] in (RunOptions, "RunOptions")


def test_a_shard_context_travels_with_its_real_credentials_and_is_hashable():
    run = RunOptions(executor="local", storage_options=SECRETS)
    ctx = ShardContext(zoo_uri="s3://b/zoo.yaml", out="s3://b/out", run_key="k", alphas=(0.6,), scope="tensor",
                       knob_mode="rms", run=run)
    back = pickle.loads(pickle.dumps(ctx))
    assert back == ctx and hash(back) == hash(ctx) and back.storage_options == SECRETS and not back.use_cuda
    _no_secret(repr(ctx))


# --- the CLI: one option group, one function that builds the RunOptions -----------------------------------

def test_run_options_of_the_flags_sets_only_what_was_given():
    assert run_options().explicit() == {}
    run = run_options(executor="local", workers=2, quiet=True, storage_option=["key=abc", "anon=false"],
                      s3_endpoint="http://127.0.0.1:9000")
    assert run.explicit() == {"executor": "local", "num_workers": 2, "show_progress": False, "storage_options": {
        "key": "abc", "anon": False, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}}


EXECUTION_FLAGS = ("--executor", "--ray-address", "--workers", "--num-gpus", "--quiet", "--verbose")
STORAGE_FLAGS = ("--storage-option", "--s3-endpoint")


@pytest.mark.parametrize("verb, flags", [
    (["build"], EXECUTION_FLAGS + STORAGE_FLAGS),
    (["merge"], EXECUTION_FLAGS + STORAGE_FLAGS),
    (["eval"], EXECUTION_FLAGS + STORAGE_FLAGS),
    (["sweep"], EXECUTION_FLAGS + STORAGE_FLAGS),
    (["demo"], EXECUTION_FLAGS),
    (["reconstruct"], STORAGE_FLAGS),
    (["registry", "query"], STORAGE_FLAGS),
])
def test_every_verb_shows_its_run_options_in_one_panel_and_an_example(verb, flags):
    res = CliRunner().invoke(app, [*verb, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert res.exit_code == 0, res.output
    panel = res.output.split("Run options", 1)[1]
    for flag in flags:
        assert flag in panel, (verb, flag)
    assert "Example" in res.output


def test_help_examples_name_files_that_exist_or_that_the_demo_writes():
    root = Path(__file__).resolve().parents[1]
    for verb in (["eval"], ["sweep"]):
        res = CliRunner().invoke(app, [*verb, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
        example = re.search(r"tswitch \w+ (pipelines/\S+\.yaml)", res.output)
        assert example and (root / example.group(1)).is_file(), res.output
