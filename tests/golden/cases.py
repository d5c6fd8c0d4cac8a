"""The golden cases: small seeded inputs, run through the `tswitch` CLI, digested by :mod:`digest`.

One function, :func:`compute_all`, makes every input inside a work folder (and
an S3 bucket), runs the CLI verbs on them and returns ``{case name: digest}``.
The recorder (record.py) writes that to golden.json from the code of the day;
tests/test_golden_identity.py recomputes it and compares case by case.

Inputs:

* ``synth``: ``tswitch zoo synth`` (vit-b-32 shapes, no transformer block, 3 fp16 tasks; the product's
  own generator, so its files are a case too);
* ``mixed``: a hand-made zoo (3 tasks; fp32, fp16 and bf16 tensors, a scalar, a zero-element tensor, an
  int64 buffer, exact zeros and many ties in the task vectors, two 1-MiB shards), written three ways:
  single .safetensors files, sharded HF folders (model.safetensors.index.json) and .pt state dicts. It is
  drawn with NumPy's PCG64 uniforms and IEEE arithmetic only (no libm, no vectorised torch samplers),
  so it is the same on every machine;
* ``demo``: the demo zoo's recipe at a tiny size (an open_clip ViT, heads and eval data), for `tswitch eval`.

Only the CLI (the stable contract) produces outputs; the demo zoo, which has no
CLI at a tiny size, is made with ``build_demo_zoo`` as tests/conftest.py does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from . import digest

TASKS = ("cars", "dtd", "eurosat")

# name -> (shape, dtype) of the hand-made zoo; about 1.3 MB per checkpoint, so `--shard-mb 1` gives 2 shards.
MIXED_LAYOUT: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "embed.weight": ((512, 256), torch.float32),
    "blocks.0.attn.weight": ((256, 256), torch.float32),
    "blocks.0.attn.bias": ((256,), torch.float16),
    "blocks.1.mlp.weight": ((1024, 256), torch.bfloat16),
    "blocks.1.mlp.bias": ((1024,), torch.float32),
    "head.scale": ((), torch.float32),
    "blocks.2.gate": ((0,), torch.float32),
    "position_ids": ((1, 16), torch.int64),
}

# Merge method -> option sets: the defaults, then non-default ones (names from `tswitch merge --help`).
MERGES: dict[str, list[dict[str, str]]] = {
    "avg": [{}],
    "ta": [{}, {"scale": "0.5"}],
    "ties": [{}, {"k": "40", "trim_scope": "tensor", "merge": "sum", "scale": "0.6"}],
    "dare": [{}, {"p": "0.3", "seed": "7", "rescale_to_sum_norm": "true"},
             {"p": "0.7", "rescale_to_sum_norm": "true", "norm_scope": "tensor"}],
    # The defaults cut "authors" (scope tensor); "cut=exact" pins the rule the defaults had before.
    "pdiscard": [{}, {"cut": "exact"}, {"alpha": "0.8", "scope": "model", "norm_scope": "tensor"}],
    "emr": [{}, {"lambda_mode": "element_sum"}],
    "tswitch": [{}, {"cut": "exact"}, {"alpha": "0.9", "scope": "model", "knob": "mean"}],
}

EVAL_METHODS: list[dict[str, Any]] = [
    {"method": "base"},
    {"method": "individual"},
    {"method": "avg"},
    {"method": "ta", "options": {"scale": 0.3}},
    {"method": "ties"},
    {"method": "dare", "options": {"p": 0.5}},
    {"method": "pdiscard", "options": {"alpha": 0.5}},
    {"method": "emr"},
    {"method": "tswitch", "alpha": 0.6},
    {"method": "tswitch", "alpha": 0.9, "artifacts": "switches-mean", "label": "tswitch mean knob"},
    {"method": "autoswitch", "alpha": 0.6, "options": {"k": 3, "examples_per_task": 8}},
    {"method": "wemoe", "options": {"tta_steps": 2, "batch_size": 8}},
    {"method": "e-wemoe", "options": {"tta_steps": 2, "batch_size": 8, "keep_fraction": 0.1}},
]


@dataclass(frozen=True)
class S3Place:
    """A bucket on a local S3 server (moto's: any credentials pass)."""

    endpoint: str
    bucket: str  # s3://name

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"client_kwargs": {"endpoint_url": self.endpoint}, "key": "testing", "secret": "testing"}

    def cli_args(self) -> list[str]:
        return ["--s3-endpoint", self.endpoint, "-S", "key=testing", "-S", "secret=testing"]

    def uri(self, name: str) -> str:
        return f"{self.bucket}/{name}"


def tswitch(*args: object) -> str:
    """Run one `tswitch` command in-process; a non-zero exit fails with the command's output."""
    from typer.testing import CliRunner

    from tswitch_ray.cli import app

    argv = [str(a) for a in args]
    res = CliRunner().invoke(app, argv, catch_exceptions=False)
    if res.exit_code != 0:
        raise AssertionError(f"`tswitch {' '.join(argv)}` exited {res.exit_code}:\n{res.output}")
    return res.output


# ---------------------------------------------------------------- inputs


def _uniform(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.random(shape)  # (next 53 bits) * 2**-53: exact, the same everywhere


def mixed_states(seed: int = 13) -> dict[str, dict[str, torch.Tensor]]:
    """Base and task state dicts of the hand-made zoo (heavy-tailed τ with exact zeros and ties)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    base: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in MIXED_LAYOUT.items():
        if not dtype.is_floating_point:
            base[name] = torch.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
            continue
        # Irwin-Hall(4) - 2: bell-shaped, from exact sums of uniforms.
        z = sum(_uniform(rng, shape) for _ in range(4)) - 2.0
        base[name] = torch.from_numpy(np.asarray(0.02 * z, dtype=np.float32)).to(dtype)
    states = {"base": base}
    for i, task in enumerate(TASKS):
        sd: dict[str, torch.Tensor] = {}
        for name, t in base.items():
            if not t.is_floating_point():
                sd[name] = t.clone()
                continue
            shape = tuple(t.shape)
            tau = (2.0 * _uniform(rng, shape) - 1.0) / np.maximum(_uniform(rng, shape), 0.05) * (1e-3 * (i + 1))
            if name == "blocks.0.attn.weight":
                tau = np.round(tau / 1e-3) * 1e-3  # many ties at every threshold
            if name == "embed.weight":
                tau = np.where(_uniform(rng, shape) < 0.3, 0.0, tau)  # exact zeros: never kept
            theta = t.to(torch.float64).numpy() + tau
            sd[name] = torch.from_numpy(np.asarray(theta, dtype=np.float32)).to(t.dtype)
        states[task] = sd
    return states


def _save_sharded(sd: dict[str, torch.Tensor], folder: Path, n_shards: int = 3) -> None:
    """An HF-style sharded checkpoint: model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    weight_map: dict[str, str] = {}
    for i in range(n_shards):
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        chunk = {n: sd[n].contiguous() for n in names[i::n_shards]}
        save_file(chunk, str(folder / file))
        weight_map.update({n: file for n in chunk})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_mixed_zoo(folder: Path, fmt: str, states: dict[str, dict[str, torch.Tensor]]) -> Path:
    """The hand-made zoo as .safetensors files, sharded folders or .pt files; returns its zoo.yaml."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    uris: dict[str, str] = {}
    for who, sd in states.items():
        if fmt == "safetensors":
            save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / f"{who}.safetensors"))
            uris[who] = f"{who}.safetensors"
        elif fmt == "sharded":
            _save_sharded(sd, folder / who)
            uris[who] = who
        elif fmt == "pt":
            torch.save(sd, str(folder / f"{who}.pt"))
            uris[who] = f"{who}.pt"
        else:
            raise ValueError(fmt)
    manifest: dict[str, Any] = {"name": f"golden-mixed-{fmt}", "base": uris["base"],
                                "tasks": [{"name": t, "uri": uris[t]} for t in TASKS]}
    if fmt == "pt":
        manifest["exclude"] = ["blocks.2.*"]  # tensor-name globs are part of the manifest contract
    path = folder / "zoo.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def upload(local: Path, place: S3Place, name: str) -> str:
    import fsspec

    fs, _ = fsspec.core.url_to_fs(place.bucket, **place.storage_options)
    dest = place.uri(name)
    fs.put(str(local), dest, recursive=True)
    return dest


def make_demo_zoo(folder: Path) -> Path:
    """The demo zoo recipe at the size tests/conftest.py uses (seconds); pinned here so that a change
    of the shared fixture cannot move the golden values."""
    from tswitch_ray.eval.demo_zoo import DemoZooConfig, build_demo_zoo

    cfg = DemoZooConfig(tasks=("digits", "glyphs", "signs"), width=32, layers=2, heads=2, embed_dim=16,
                        n_train=96, n_eval=48, n_unlabeled=32, n_pretrain=256, pretrain_steps=4,
                        pretrain_batch=32, probe_steps=20, finetune_steps=4, finetune_batch=16)
    return build_demo_zoo(folder, seed=0, config=cfg)


# ---------------------------------------------------------------- cases


def _build(zoo: str, out: str, alphas: tuple[float, ...], scope: str, knob: str, *extra: str) -> None:
    args: list[object] = ["build", "--zoo", zoo, "--out", out, "--scope", scope, "--knob", knob, "--shard-mb", 1,
                          "-q", *extra]
    for a in alphas:
        args += ["--alpha", a]
    tswitch(*args)


def _merge(zoo: str, method: str, options: dict[str, str], out: str, *extra: str) -> None:
    opts = [x for k, v in options.items() for x in ("-O", f"{k}={v}")]
    tswitch("merge", "--zoo", zoo, "--method", method, "--out", out, *opts, "-q", *extra)


def _options_label(options: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"


@dataclass
class Run:
    """Where one computation of the cases happens, and what it made so far."""

    work: Path
    place: S3Place
    say: Callable[[str], None]
    digests: dict[str, Any] = field(default_factory=dict)
    zoos: dict[str, str] = field(default_factory=dict)  # input name -> zoo.yaml URI
    built: dict[str, str] = field(default_factory=dict)  # build case -> artifact URI

    def options_for(self, uri: str) -> dict[str, Any] | None:
        return self.place.storage_options if uri.startswith("s3://") else None

    def record(self, name: str, value: Any) -> None:
        self.digests[name] = value
        self.say(name)


def compute_all(work: Path, place: S3Place, say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Every golden case's digest, by case name. ``work`` must be an empty folder."""
    run = Run(work, place, say)
    _make_inputs(run)
    _build_cases(run)
    _reconstruct_cases(run)
    _merge_cases(run)
    run.record("eval/demo-tiny/results", _eval_case(work / "eval"))
    return run.digests


def _make_inputs(run: Run) -> None:
    synth = run.work / "synth"
    tswitch("zoo", "synth", "--arch", "vit-b-32", "--tasks", 3, "--dtype", "fp16", "--layers", 0, "--seed", 3,
            "--out", synth)
    run.zoos["synth"] = str(synth / "zoo.yaml")
    run.record("zoo-synth/vit-b-32-3x-fp16-0l", {
        "manifest": yaml.safe_load((synth / "zoo.yaml").read_text()),
        "files": {p.name: digest.safetensors_file_digest(str(p)) for p in sorted(synth.glob("*.safetensors"))},
    })
    states = mixed_states()
    for fmt in ("safetensors", "sharded", "pt"):
        run.zoos[f"mixed-{fmt}"] = str(write_mixed_zoo(run.work / f"mixed-{fmt}", fmt, states))
        run.zoos[f"mixed-{fmt}-s3"] = upload(run.work / f"mixed-{fmt}", run.place, f"mixed-{fmt}") + "/zoo.yaml"


def _build_cases(run: Run) -> None:
    """Every zoo format, local and S3, both scopes, knobs and cut rules, several α; one on Ray (the default).

    The scope-tensor cases of before the cut option keep their names and digests under an explicit
    ``--cut exact``; the ``-authors`` cases pin the default cut of scope tensor (docs/MATH.md "Cut rules"),
    with α = 0.999, where small tensors keep a whole sign (int(n·(1−α)) = 0).
    """
    local, s3 = ["--executor", "local"], ["--executor", "local", *run.place.cli_args()]
    exact, authors = ["--cut", "exact"], ["--cut", "authors"]
    sw = run.work / "switches"
    # (case, input zoo, output, alphas, scope, knob, extra arguments)
    builds = [
        ("synth/local/tensor-rms/ray", "synth", str(sw / "synth-tensor"), (0.6, 0.9), "tensor", "rms",
         ["--workers", "2", *exact]),
        ("synth/local/model-mean", "synth", str(sw / "synth-model"), (0.5, 0.8), "model", "mean", local),
        ("mixed-safetensors/local/tensor-rms", "mixed-safetensors", str(sw / "st-tensor"), (0.0, 0.5, 0.9),
         "tensor", "rms", [*local, *exact]),
        ("mixed-sharded/local/model-rms", "mixed-sharded", str(sw / "sh-model"), (0.3, 0.7), "model", "rms", local),
        ("mixed-pt/local/tensor-mean", "mixed-pt", str(sw / "pt-tensor"), (0.5, 0.9), "tensor", "mean",
         [*local, *exact]),
        ("mixed-safetensors/s3/model-mean", "mixed-safetensors-s3", run.place.uri("sw/st-model"), (0.6, 0.9),
         "model", "mean", s3),
        ("mixed-sharded/s3/tensor-rms", "mixed-sharded-s3", run.place.uri("sw/sh-tensor"), (0.0, 0.5, 0.9),
         "tensor", "rms", [*s3, *exact]),
        ("mixed-pt/s3/model-rms", "mixed-pt-s3", run.place.uri("sw/pt-model"), (0.3, 0.7), "model", "rms", s3),
        ("synth/local/tensor-rms-authors", "synth", str(sw / "synth-tensor-authors"), (0.6, 0.9), "tensor", "rms",
         local),
        ("mixed-safetensors/local/tensor-rms-authors", "mixed-safetensors", str(sw / "st-tensor-authors"),
         (0.0, 0.5, 0.9, 0.999), "tensor", "rms", local),
        ("mixed-pt/local/tensor-mean-authors", "mixed-pt", str(sw / "pt-tensor-authors"), (0.5, 0.9), "tensor",
         "mean", [*local, *authors]),
        ("mixed-sharded/s3/tensor-rms-authors", "mixed-sharded-s3", run.place.uri("sw/sh-tensor-authors"),
         (0.0, 0.5, 0.9), "tensor", "rms", s3),
    ]
    for name, zoo, dest, alphas, scope, knob, extra in builds:
        _build(run.zoos[zoo], dest, alphas, scope, knob, *extra)
        run.built[name] = dest
        run.record(f"build/{name}", digest.artifact_digest(dest, run.options_for(dest)))


def _reconstruct_cases(run: Run) -> None:
    rec = run.work / "reconstructed"
    # (case, build case, task, alpha, output, extra arguments)
    reconstructs = [
        ("synth/local/tensor-rms/task_02@0.9", "synth/local/tensor-rms/ray", "task_02", 0.9,
         str(rec / "synth.safetensors"), []),
        ("mixed-sharded/local/model-rms/dtd@0.7", "mixed-sharded/local/model-rms", "dtd", 0.7,
         str(rec / "sharded.safetensors"), []),
        ("mixed-pt/s3/model-rms/eurosat@0.3", "mixed-pt/s3/model-rms", "eurosat", 0.3,
         run.place.uri("reconstructed/pt.safetensors"), run.place.cli_args()),
        ("mixed-safetensors/local/tensor-rms-authors/dtd@0.999", "mixed-safetensors/local/tensor-rms-authors",
         "dtd", 0.999, str(rec / "authors.safetensors"), []),
    ]
    for name, build, task, alpha, dest, extra in reconstructs:
        tswitch("reconstruct", "--artifacts", run.built[build], "--task", task, "--alpha", alpha, "--out", dest,
                *extra)
        run.record(f"reconstruct/{name}", digest.safetensors_file_digest(dest, run.options_for(dest)))


def _merge_cases(run: Run) -> None:
    """Every method with its defaults and non-default options, then the other readers and the S3 writer."""
    local = ["--executor", "local"]
    merged = run.work / "merged"
    for method, option_sets in MERGES.items():
        for i, options in enumerate(option_sets):
            dest = str(merged / f"{method}-{i}")
            _merge(run.zoos["mixed-safetensors"], method, options, dest, *local)
            run.record(f"merge/mixed-safetensors/local/{method}/{_options_label(options)}",
                       digest.safetensors_folder_digest(dest))
    for name, zoo, method, dest, extra in [
        ("mixed-sharded/s3/ties/defaults", "mixed-sharded-s3", "ties", run.place.uri("merged/ties"),
         [*local, *run.place.cli_args()]),
        ("mixed-pt/local/emr/defaults", "mixed-pt", "emr", str(merged / "pt-emr"), local),
    ]:
        _merge(run.zoos[zoo], method, {}, dest, *extra)
        run.record(f"merge/{name}", digest.safetensors_folder_digest(dest, run.options_for(dest)))


def _eval_case(folder: Path) -> dict[str, Any]:
    """`tswitch eval` of every method (and a grid) on the tiny demo zoo; the results table's digest.

    Builds and merges with the defaults (cut "authors" since it became the default of scope tensor)."""
    zoo = make_demo_zoo(folder / "zoo")
    _build(str(zoo), str(folder / "switches"), (0.6, 0.9), "tensor", "rms", "--executor", "local")
    _build(str(zoo), str(folder / "switches-mean"), (0.9,), "tensor", "mean", "--executor", "local")
    config = {
        "name": "golden",
        "zoo": "zoo/zoo.yaml",
        "artifacts": "switches",
        "limit": 24,
        "batch_size": 16,
        "methods": EVAL_METHODS,
        "grid": [{"method": ["dare"], "options.p": [0.2, 0.8]}],
    }
    cfg = folder / "eval.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    work = folder / "work"
    tswitch("eval", cfg, "--executor", "local", "--no-tracking", "--work-dir", work, "-q")
    return digest.results_digest(str(work / "results.parquet"))


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def ensure_worker_path() -> None:
    """Ray workers import tswitch_ray from PYTHONPATH: put this checkout first, as the shell would."""
    root = str(repo_root())
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


# Cases whose inputs come from torch's samplers or from training (the synth zoo, the demo
# zoo): their last bits may depend on the CPU's vector units, so they are compared only on
# a machine like the one that recorded them. The hand-made "mixed" zoo (PCG64 uniforms and
# IEEE arithmetic) is the same everywhere and always compared.
TORCH_DERIVED = ("zoo-synth/", "build/synth/", "reconstruct/synth/", "merge/synth/", "eval/")


def machine() -> dict[str, str]:
    """What the torch-derived cases depend on: CPU model, its vector capability and torch's version."""
    import platform

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "torch": torch.__version__}
