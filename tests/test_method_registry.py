"""The method registry: names and aliases, options validated by each method's pydantic model, what every
consumer reads from an entry (eval config, storage, scorer, `tswitch merge`), and a new method added as one
file — the worked example of docs/ARCHITECTURE.md "Adding a method" — seen by `tswitch merge --help`,
merged by `tswitch merge`, and scored by `tswitch eval`, with nothing else edited."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

import tswitch_ray
from tswitch_ray.cli import app
from tswitch_ray.distributed.build import BuildConfig, run_build
from tswitch_ray.distributed.eval_runner import run_eval
from tswitch_ray.errors import ConfigError
from tswitch_ray.eval.config import EvalConfig, MethodSpec
from tswitch_ray.eval.scoring import SCORERS
from tswitch_ray.methods import (
    MethodInfo,
    MethodKind,
    MethodOptions,
    StorageModel,
    get_method,
    get_method_info,
    merge_in_memory,
    register,
    registered,
    validate_options,
)
from tswitch_ray.methods import registry as registry_module
from tswitch_ray.methods.base import LocalMethod, to_base_dtype
from tswitch_ray.methods.storage import one_model_bytes
from tswitch_ray.tracking import TrackingConfig

from test_build_reconstruct import make_state, write_zoo

# --------------------------------------------------------------------------- names


def test_every_entry_resolves_by_name_and_alias_in_any_spelling():
    names = [i.name for i in registered()]
    assert sorted(names) == sorted(["base", "individual", "avg", "ta", "ties", "dare", "pdiscard", "emr",
                                    "tswitch", "autoswitch", "wemoe", "e-wemoe"])
    for info in registered():
        for spelling in (info.name, info.name.upper(), info.name.replace("-", "_"), *info.aliases):
            assert get_method_info(spelling) is info, spelling
    assert get_method_info("Task-Arithmetic").name == "ta"
    assert get_method_info("E_WEMOE").name == get_method_info("ewemoe").name == "e-wemoe"
    assert get_method_info("p-discard").name == "pdiscard"
    assert get_method_info("T-Switch").name == "tswitch"


def test_unknown_name_lists_every_registered_name():
    with pytest.raises(ConfigError) as exc:
        get_method_info("fisher")
    msg = str(exc.value)
    assert "unknown method 'fisher'" in msg
    for info in registered():
        assert info.name in msg


def test_kinds_scorers_and_requirements_of_the_entries():
    table = {i.name: (i.kind, i.scorer, i.needs_alpha, i.needs_artifacts, i.scores_all_tasks_at_once)
             for i in registered()}
    one, per, ev, ref = MethodKind.ONE_MODEL, MethodKind.PER_TASK, MethodKind.EVAL_TIME, MethodKind.REFERENCE
    assert table == {
        "base": (ref, "zoo-base", False, False, False),
        "individual": (ref, "zoo-task", False, False, False),
        "avg": (one, "merged-one", False, False, False),
        "ta": (one, "merged-one", False, False, False),
        "ties": (one, "merged-one", False, False, False),
        "dare": (one, "merged-one", False, False, False),
        "pdiscard": (one, "merged-one", False, False, False),
        "emr": (per, "merged-per-task", False, False, False),
        "tswitch": (per, "switches", True, True, False),
        "autoswitch": (ev, "autoswitch", True, True, True),
        "wemoe": (ev, "wemoe", False, False, True),
        "e-wemoe": (ev, "wemoe", False, False, True),
    }
    assert {i.name for i in registered() if i.merged_by_eval} == {"avg", "ta", "ties", "dare", "pdiscard", "emr"}
    for info in registered():
        assert info.scorer in SCORERS, info.name
        assert info.summary and "\n" not in info.summary


def test_a_name_or_alias_cannot_be_registered_twice(monkeypatch):
    monkeypatch.setattr(registry_module, "_METHODS", dict(registry_module._METHODS))
    with pytest.raises(ValueError, match="already registered by ta"):
        register(MethodInfo(name="Task-Arithmetic", kind=MethodKind.REFERENCE, summary="x", scorer="zoo-base"))
    with pytest.raises(ValueError, match="needs a factory"):
        MethodInfo(name="nofactory", kind=MethodKind.ONE_MODEL, summary="x", scorer="merged-one")


# --------------------------------------------------------------------------- options


def test_options_are_coerced_and_bad_ones_name_the_field():
    assert validate_options("ties", {"k": "20"}).k == 20.0  # `-O k=20` arrives as a string or an int
    assert get_method("dare", seed="3").seed == 3
    with pytest.raises(ConfigError, match=r"method 'ties': option 'k': Input should be a valid number.*\(got 'abc'\)"):
        validate_options("ties", {"k": "abc"})
    with pytest.raises(ConfigError, match=r"option 'k': Input should be less than or equal to 100 \(got 200\)"):
        validate_options("ties", {"k": 200})
    with pytest.raises(ConfigError, match=r"option 'trim_scope': Input should be 'model' or 'tensor'"):
        validate_options("ties", {"trim_scope": "layer"})
    with pytest.raises(ConfigError, match=r"option 'p'.*not a boolean"):
        validate_options("dare", {"p": True})
    with pytest.raises(ConfigError) as exc:
        validate_options("ties", {"k": 20, "top_k": 5, "alpha": 1})
    assert "method 'ties' has no option(s) alpha, top_k; its options are: k=20.0, trim_scope='model', " \
           "merge='mean', scale=0.3." == str(exc.value)


def test_eval_options_of_eval_time_methods_and_tswitch():
    spec = MethodSpec(method="autoswitch", alpha=0.6, options={"k": "x"})
    with pytest.raises(ConfigError, match="method 'autoswitch': option 'k'"):
        spec.check()
    with pytest.raises(ConfigError, match="needs `alpha`"):
        MethodSpec(method="autoswitch").check()
    # T-Switch's switches are built by `tswitch build`: an eval config gives alpha and no options.
    with pytest.raises(ConfigError, match="method 'tswitch' has no option.s. knob in an eval config"):
        MethodSpec(method="tswitch", alpha=0.6, options={"knob": "mean"}).check()
    # null in an eval config means the default, as before the registry.
    wemoe = MethodSpec(method="wemoe", options={"tta_steps": None, "batch_size": 8})
    wemoe.check()
    assert wemoe.validated_options().tta_steps == 200 and wemoe.options == {"tta_steps": None, "batch_size": 8}
    assert MethodSpec(method="e-wemoe").validated_options().keep_fraction == 0.1
    with pytest.raises(ConfigError, match="option 'keep_fraction'"):
        MethodSpec(method="wemoe", options={"keep_fraction": 2}).check()


def test_option_models_agree_with_the_eval_drivers_defaults():
    """The scorers pass each eval-time method's validated options, defaults included, to its driver: the
    defaults must be the driver's own, or results would change with the registry."""
    from tswitch_ray.eval.autoswitch_eval import FEATURE_MODELS, evaluate_autoswitch
    from tswitch_ray.eval.wemoe_eval import evaluate_wemoe

    for name, driver in (("autoswitch", evaluate_autoswitch), ("wemoe", evaluate_wemoe)):
        params = inspect.signature(driver).parameters
        for option, default in get_method_info(name).defaults().items():
            assert params[option].default == default, (name, option)
    assert get_method_info("autoswitch").options.model_fields["feature_model"].annotation.__args__ == FEATURE_MODELS


def test_storage_formulas_of_every_method():
    sm = StorageModel(n_tasks=4, model_bytes=1000, float_numel=400, mlp_numel=100, dtype_bytes=2.0,
                      switch_bytes={0.6: 120})
    assert sm.bytes_for("individual") == 4000
    for name in ("base", "avg", "ta", "ties", "dare", "pdiscard"):
        assert sm.bytes_for(name) == 1000, name
    assert sm.bytes_for("emr") == 1000 + 4 * 50
    assert sm.bytes_for("tswitch", 0.6) == 1120 and sm.bytes_for("tswitch", 0.9) == -1
    assert sm.bytes_for("autoswitch", 0.6, {"k": 3}, query_bytes=7) == 1127
    assert sm.bytes_for("autoswitch", None, {}, query_bytes=7) == -1
    assert sm.bytes_for("wemoe") == 1000 + 4 * 100 * 2
    assert sm.bytes_for("e-wemoe") == 1000 + int(4 * 100 * 0.1 * 6)
    assert sm.bytes_for("e-wemoe", None, {"keep_fraction": 0.01}) == 1000 + int(4 * 100 * 0.01 * 6)
    assert sm.bytes_for("e-wemoe", None, {"keep_fraction": 0}) == sm.bytes_for("e-wemoe")  # as before: 0 -> 0.1


# --------------------------------------------------------------------------- a toy method, in-process


class HalfOptions(MethodOptions):
    weight: float = 0.5


class Half(HalfOptions, LocalMethod):
    """θ0 + weight·τ of the first task only."""

    name: ClassVar[str] = "half"
    per_task: ClassVar[bool] = False

    def merge_tensor(self, name: str, base: torch.Tensor, taus: list[torch.Tensor], params: Any) -> torch.Tensor:
        return to_base_dtype(base.to(torch.float32) + self.weight * taus[0], base)


@pytest.fixture
def toy_method(monkeypatch):
    """Registers "half" on a copy of the registry, restored afterwards: no other test sees it."""
    monkeypatch.setattr(registry_module, "_METHODS", dict(registry_module._METHODS))
    return register(MethodInfo(name="half", aliases=("first_half",), kind=MethodKind.ONE_MODEL,
                               summary="Half of the first task vector.", options=HalfOptions, factory=Half,
                               scorer="merged-one", storage=one_model_bytes))


def test_a_registered_method_is_seen_by_every_consumer(toy_method, tmp_path):
    assert toy_method in registered(MethodKind.ONE_MODEL)
    spec = MethodSpec(method="First-Half", options={"weight": 0.25})
    assert spec.method == "half"
    spec.check()
    with pytest.raises(ConfigError, match="method 'half': option 'weight'"):
        MethodSpec(method="half", options={"weight": "lots"}).check()
    assert StorageModel(2, 10, 4, 0, 2.0).bytes_for("half") == 10

    runner = CliRunner()
    help_text = " ".join(runner.invoke(app, ["merge", "--help"]).output.split())
    assert "half (one-model merge, alias first_half): Half of the first task vector. Options: weight=0.5." \
        in help_text

    zoo = write_zoo(tmp_path / "zoo", make_state(seed=1), "safetensors")
    res = runner.invoke(app, ["merge", "--zoo", str(zoo), "--method", "half", "-O", "weight=0.25",
                              "--out", str(tmp_path / "out"), "--executor", "local", "--quiet"])
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "out" / "merged.safetensors"))
    states = make_state(seed=1)
    base = {n: t for n, t in states["base"].items() if t.is_floating_point()}
    first = {n: states["cars"][n] for n in base}  # the zoo's first task
    expected = merge_in_memory(Half(weight=0.25), base, [first])
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name
    assert not torch.equal(merged["embed.weight"], base["embed.weight"])


def test_the_toy_method_is_gone_after_its_test():
    with pytest.raises(ConfigError, match="unknown method 'half'"):
        get_method_info("half")


# --------------------------------------------------------------------------- `tswitch merge` refusals


def _merge(*args: object):
    return CliRunner().invoke(app, ["merge", *[str(a) for a in args]], catch_exceptions=False)


@pytest.mark.parametrize("args, needle", [
    (["--method", "ties", "-O", "k=abc"], "method 'ties': option 'k': Input should be a valid number"),
    (["--method", "ties", "-O", "kk=20"], "method 'ties' has no option(s) kk; its options are: k=20.0"),
    (["--method", "ties", "-O", "k"], "--option expects KEY=VALUE"),
    (["--method", "autoswitch"], "method 'autoswitch' is not a state-dict merge (eval-time method)"),
    (["--method", "individual"], "method 'individual' is not a state-dict merge (reference row)"),
    (["--method", "fisher"], "unknown method 'fisher'; choose one of"),
])
def test_merge_refuses_bad_methods_and_options_before_any_work(tmp_path, args, needle):
    zoo = write_zoo(tmp_path / "zoo", make_state(seed=2), "safetensors")
    res = _merge("--zoo", zoo, "--out", tmp_path / "out", "--executor", "local", "--quiet", *args)
    flat = " ".join(res.stderr.split())
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert flat.startswith("error:") and "Traceback" not in res.output
    assert needle in flat, flat
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- results rows: each method's artifacts


@pytest.fixture(scope="module")
def two_switch_builds(tiny_demo_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("switches")
    for name, knob in (("rms", "rms"), ("mean", "mean")):
        run_build(BuildConfig(zoo=str(tiny_demo_zoo), out=str(root / name), alphas=[0.6], knob=knob,
                              executor="local", show_progress=False))
    return root / "rms", root / "mean"


def test_results_rows_carry_each_methods_own_artifact_uri(tiny_demo_zoo, two_switch_builds, tmp_path):
    default, own = two_switch_builds
    specs = [MethodSpec(method="tswitch", alpha=0.6, label="config's"),
             MethodSpec(method="tswitch", alpha=0.6, artifacts=str(own), label="own"),
             MethodSpec(method="autoswitch", alpha=0.6, artifacts=str(own), options={"k": 2, "examples_per_task": 4},
                        label="auto own"),
             MethodSpec(method="individual")]
    cfg = EvalConfig(name="uris", zoo=str(tiny_demo_zoo), artifacts=str(default), work_dir=str(tmp_path / "w"),
                     methods=specs, executor="local", limit=8, batch_size=8, tracking=TrackingConfig(enabled=False))
    result = run_eval(cfg, show_progress=False)
    rows = pq.read_table(result.files["results.parquet"]).to_pylist()
    uris = {(r["label"], r["artifact_uri"]) for r in rows}
    assert uris == {("config's", str(default)), ("own", str(own)), ("auto own", str(own)), ("individual", None)}
    # the two T-Switch rows really were scored from different switches (knob rms vs mean)
    summary = {s["label"]: s for s in result.summary}
    assert summary["own"]["storage_bytes"] > 0 and summary["config's"]["storage_bytes"] > 0


# --------------------------------------------------------------------------- adding a method = adding one file

#: The worked example of docs/ARCHITECTURE.md "Adding a method": tswitch_ray/methods/consensus.py.
EXAMPLE_METHOD = '''
"""Sign-consensus Task Arithmetic: θ = θ0 + s·Σt τt ⊙ [sign(τt) = sign(Σu τu)].

docs/MATH.md "Sign-consensus Task Arithmetic": each task keeps only the entries
whose sign agrees with the sign of the summed task vectors (TIES' sign election
without its trim), then the kept entries are added as in Task Arithmetic.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tswitch_ray.methods.base import LocalMethod, signed_sum, to_base_dtype
from tswitch_ray.methods.registry import MethodInfo, MethodKind, MethodOptions, Number, register
from tswitch_ray.methods.storage import one_model_bytes

Tensor = torch.Tensor


def consensus_sum(taus: list[Tensor]) -> Tensor:
    """Σt τt ⊙ [sign(τt) = sign(Σu τu)], fp32 (docs/MATH.md "Sign-consensus Task Arithmetic")."""
    elected = torch.sign(signed_sum(taus))
    return signed_sum([torch.where(torch.sign(tau) == elected, tau, 0.0) for tau in taus])


class ConsensusOptions(MethodOptions):
    scale: Number = 0.3  # s, as Task Arithmetic's


class Consensus(ConsensusOptions, LocalMethod):
    """One merged model; no statistics rounds (every tensor is merged on its own)."""

    name: ClassVar[str] = "consensus"
    per_task: ClassVar[bool] = False

    def merge_tensor(self, name: str, base: Tensor, taus: list[Tensor], params: Any) -> Tensor:
        return to_base_dtype(base.to(torch.float32) + self.scale * consensus_sum(taus), base)


register(MethodInfo(
    name="consensus", aliases=("sign_consensus_ta",), kind=MethodKind.ONE_MODEL,
    summary="Sign-consensus Task Arithmetic: add only the entries that agree with the summed sign.",
    options=ConsensusOptions, factory=Consensus, scorer="merged-one", storage=one_model_bytes,
))
'''

#: Its test, as the example's tests/test_methods_consensus.py.
EXAMPLE_TEST = '''
import pytest
import torch

from tswitch_ray.errors import ConfigError
from tswitch_ray.methods import get_method, merge_in_memory


def test_consensus_keeps_the_entries_that_agree_with_the_summed_sign():
    base = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    tasks = [{"w": torch.tensor([2.0, -1.0, 4.0, 1.0])},   # τ1 = [1, -2, 3, 0]
             {"w": torch.tensor([2.0, 2.0, 0.0, 1.0])}]    # τ2 = [1, 1, -1, 0]; sign(Σ) = [+, -, +, 0]
    merged = merge_in_memory(get_method("consensus", scale=0.5), base, tasks)
    assert torch.equal(merged["w"], torch.tensor([1.0 + 0.5 * 2, 1.0 - 0.5 * 2, 1.0 + 0.5 * 3, 1.0]))


def test_consensus_options_are_validated():
    assert get_method("Sign-Consensus-TA").scale == 0.3
    with pytest.raises(ConfigError, match="option 'scale'"):
        get_method("consensus", scale="big")
'''


def _python(*args: str, cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_method_added_as_one_file_is_merged_evaluated_and_listed(tiny_demo_zoo, tmp_path):
    """A copy of the package plus tswitch_ray/methods/consensus.py, nothing else edited: `tswitch merge --help`
    lists it, `tswitch merge` builds it, an eval config accepts it and its rows reach results.parquet."""
    checkout = tmp_path / "checkout"
    shutil.copytree(Path(tswitch_ray.__file__).parent, checkout / "tswitch_ray",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (checkout / "tswitch_ray" / "methods" / "consensus.py").write_text(textwrap.dedent(EXAMPLE_METHOD))
    (tmp_path / "test_methods_consensus.py").write_text(textwrap.dedent(EXAMPLE_TEST))

    tests = _python("-m", "pytest", "-q", "-p", "no:cacheprovider", "test_methods_consensus.py",
                    cwd=tmp_path, pythonpath=checkout)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "2 passed" in tests.stdout

    helped = _python("-m", "tswitch_ray.cli", "merge", "--help", cwd=tmp_path, pythonpath=checkout)
    assert helped.returncode == 0, helped.stderr
    assert "consensus (one-model merge, alias sign_consensus_ta): Sign-consensus Task Arithmetic" \
        in " ".join(helped.stdout.split())

    merged = _python("-m", "tswitch_ray.cli", "merge", "--zoo", str(tiny_demo_zoo), "--method", "consensus",
                     "-O", "scale=0.5", "--out", str(tmp_path / "merged"), "--executor", "local", "--quiet",
                     cwd=tmp_path, pythonpath=checkout)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert (tmp_path / "merged" / "merged.safetensors").exists()

    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "name": "one-file", "zoo": str(tiny_demo_zoo), "work_dir": str(tmp_path / "work"), "executor": "local",
        "limit": 8, "batch_size": 8, "tracking": {"enabled": False},
        "methods": [{"method": "Sign-Consensus-TA", "options": {"scale": 0.5}}, {"method": "ta"}],
    }))
    evaluated = _python("-m", "tswitch_ray.cli", "eval", str(config), "--quiet", cwd=tmp_path, pythonpath=checkout)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    rows = pq.read_table(tmp_path / "work" / "results.parquet").to_pylist()
    consensus = [r for r in rows if r["method"] == "consensus"]
    assert len(consensus) == 3 and all(0.0 <= r["accuracy"] <= 1.0 for r in consensus)
    assert json.loads(consensus[0]["options"]) == {"scale": 0.5}
    assert consensus[0]["storage_bytes"] == next(r for r in rows if r["method"] == "ta")["storage_bytes"]

    # ... and without the file, the same package does not know the method.
    (checkout / "tswitch_ray" / "methods" / "consensus.py").unlink()
    gone = _python("-m", "tswitch_ray.cli", "merge", "--zoo", str(tiny_demo_zoo), "--method", "consensus",
                   "--out", str(tmp_path / "m2"), "--executor", "local", cwd=tmp_path, pythonpath=checkout)
    assert gone.returncode == 2 and "unknown method 'consensus'" in gone.stderr
