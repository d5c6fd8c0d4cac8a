"""The real-model zoo: the pretrained Silero VAD network of the ``silero-vad`` wheel, fine-tuned here on real data.

Where the demo zoo (:mod:`tswitch_ray.eval.demo_zoo`) pretrains its own tiny
ViT, this zoo starts from weights somebody else trained: the voice-activity
model that the ``silero-vad`` package ships as safetensors
(:mod:`tswitch_ray.eval.adapters.silero`). Nothing is downloaded: the base is
read from the installed wheel, the data are package data.

1. **Data** — the real-data tasks of :mod:`tswitch_ray.eval._tasks` at 24×24
   (sklearn digits, scikit-image textures and photos, matplotlib's fonts),
   read as 576-sample signals (one chunk of the model).
2. **Base** — the package's ``silero_vad_16k.safetensors``, unchanged, written
   as ``base.safetensors`` (same keys).
3. **Heads** — per task, a linear probe on the frozen base features (the
   LSTM state); the base model's accuracy in ``zoo_report.json`` is this probe.
4. **Fine-tuning** — per task, the whole network from the base weights with
   the task head frozen (the task-vectors protocol, as the demo zoo's
   ``frozen_probe``), seeded.

The files and their layout are the demo zoo's (``zoo.yaml``, ``base.safetensors``,
``tasks/``, ``heads/``, ``data/``, ``demo.json``, ``zoo_report.json``), so
``tswitch build`` / ``merge`` / ``eval`` read it as they read the demo zoo.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tswitch_ray.errors import ConfigError
from tswitch_ray.eval import _tasks
from tswitch_ray.eval.adapters.heads import LinearHead, save_head
from tswitch_ray.eval.adapters.silero import (
    SIDE,
    SileroVAD,
    SileroVADAdapter,
    checkpoint_state,
    packaged_weights_path,
    signals_from_images,
)
from tswitch_ray.eval.datasets import open_eval_dataset, write_image_parquet
from tswitch_ray.eval.demo_zoo import (
    _cached,
    _clear_previous,
    _features,
    _finetune,
    _timed,
    _train_probe,
    write_zoo_manifest,
)
from tswitch_ray.eval.evaluate import evaluate
from tswitch_ray.io.atomic import atomic_write, read_bytes
from tswitch_ray.io.safetensors import read_safetensors, save_safetensors

RECIPE_VERSION = 1
ZOO_NAME = "tswitch-real-silero"
MODEL_NAME = "silero-vad-16k"
REAL_TASKS = ("digits", "textures", "scenes", "glyphs")


@dataclass(frozen=True)
class RealZooConfig:
    """Every knob of the recipe; its hash (with the seed and the base file's digest) identifies a cached build."""

    tasks: tuple[str, ...] = REAL_TASKS
    n_train: int = 1024
    n_eval: int = 300
    n_unlabeled: int = 128  # written as data/<task>/train.parquet (Auto-Switch queries, WEMoE adaptation)
    probe_steps: int = 300
    probe_lr: float = 0.05
    finetune_steps: int = 200
    finetune_batch: int = 64
    finetune_lr: float = 1e-3
    weight_decay: float = 0.0
    head_mode: str = "frozen_probe"  # read by demo_zoo._finetune
    threads: int = 1

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("real zoo: at least one task is needed.")
        for t in self.tasks:
            if not _tasks.task_info(t).real:
                raise ConfigError(f"real zoo: task {t!r} is generated, not real data; use some of {', '.join(REAL_TASKS)}.")


class _Tower(torch.nn.Module):
    """The network seen as a feature tower (what demo_zoo's probe and fine-tuning loops call)."""

    def __init__(self, net: SileroVAD) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def recipe_hash(config: RealZooConfig, seed: int, base_sha: str) -> str:
    blob = json.dumps({"version": RECIPE_VERSION, "seed": seed, "base": base_sha, "config": asdict(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _base_digest(path: str) -> str:
    return hashlib.sha256(read_bytes(path)).hexdigest()


def build_real_zoo(out_dir: str | os.PathLike[str], seed: int = 0, force: bool = False, config: RealZooConfig | None = None,
                   progress: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse, when cached with this recipe) the real-model zoo in ``out_dir``; returns ``zoo.yaml``'s path."""
    cfg = config or RealZooConfig()
    cfg.validate()
    out = Path(out_dir)
    weights = packaged_weights_path()
    h = recipe_hash(cfg, seed, _base_digest(weights))
    if not force and _cached(out, h):
        return out / "zoo.yaml"
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _build(out, weights, seed, cfg, h, progress or (lambda m: None))
    finally:
        torch.set_num_threads(old_threads)


def _build(out: Path, weights: str, seed: int, cfg: RealZooConfig, h: str, say: Callable[[str], None]) -> Path:
    t0, cpu0 = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    _clear_previous(out)
    with _timed(timings, "data"):
        xs, ys = _write_data(out, seed, cfg)
    base_sd, _ = read_safetensors(weights)
    save_safetensors(base_sd, str(out / "base.safetensors"), metadata={"format": "pt", "model": MODEL_NAME, "source": "silero-vad wheel: silero_vad/data/silero_vad_16k.safetensors"})
    base = SileroVADAdapter(heads={}).build(base_sd)
    gen = torch.Generator().manual_seed(seed)
    heads: dict[str, LinearHead] = {}
    report: dict[str, dict] = {}
    with _timed(timings, "probe_and_finetune"):
        for t in cfg.tasks:
            classes = list(_tasks.task_info(t).classes)
            probe = _train_probe(_features(_Tower(base), xs[t]), ys[t], len(classes), cfg, classes)  # type: ignore[arg-type]
            tower, head, losses = _finetune(_Tower(base), probe, xs[t], ys[t], cfg, gen)  # type: ignore[arg-type]
            save_safetensors(checkpoint_state(tower.net), str(out / "tasks" / f"{t}.safetensors"), metadata={"format": "pt", "model": MODEL_NAME, "task": t})
            save_head(str(out / "heads" / f"{t}.safetensors"), head)
            heads[t] = head
            report[t] = {"finetune_loss_first": losses[0], "finetune_loss_last5_mean": float(np.mean(losses[-5:]))}
            say(f"finetune {t}: loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}")
    with _timed(timings, "eval"):
        _measure(out, cfg, base_sd, heads, report, say)
    timings["total"] = time.perf_counter() - t0
    timings["cpu_total"] = time.process_time() - cpu0
    _write_report(out, seed, cfg, h, timings, report)
    _write_description(out, seed, cfg, h)
    return _write_manifest(out, cfg, h)


def _write_data(out: Path, seed: int, cfg: RealZooConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    xs: dict[str, torch.Tensor] = {}
    ys: dict[str, torch.Tensor] = {}
    for t in cfg.tasks:
        imgs, labels = _tasks.generate(t, "train", cfg.n_train + cfg.n_unlabeled, seed, SIDE)
        xs[t] = signals_from_images(imgs[: cfg.n_train])
        ys[t] = torch.from_numpy(labels[: cfg.n_train])
        write_image_parquet(str(out / "data" / t / "train.parquet"), imgs[cfg.n_train :], labels[cfg.n_train :])
        ev_imgs, ev_labels = _tasks.generate(t, "eval", cfg.n_eval, seed, SIDE)
        write_image_parquet(str(out / "data" / t / "eval.parquet"), ev_imgs, ev_labels)
    return xs, ys


def _measure(out: Path, cfg: RealZooConfig, base_sd: dict[str, torch.Tensor], heads: dict[str, LinearHead], report: dict[str, dict], say: Callable[[str], None]) -> None:
    """Accuracies through the eval path: parquet -> adapter.collate -> built model -> head."""
    for t in cfg.tasks:
        ad = SileroVADAdapter(heads={t: heads[t]}, source=str(out))
        ds = open_eval_dataset(str(out / "data" / t / "eval.parquet"))
        task_sd = read_safetensors(str(out / "tasks" / f"{t}.safetensors"))[0]
        report[t]["base_accuracy"] = evaluate(ad, ad.build(base_sd), ds, t, device="cpu")["accuracy"]
        report[t]["finetuned_accuracy"] = evaluate(ad, ad.build(task_sd), ds, t, device="cpu")["accuracy"]
        report[t].update(n_eval=len(ds), n_classes=heads[t].num_classes)
        say(f"eval {t}: base(probe) {report[t]['base_accuracy']:.3f}  finetuned {report[t]['finetuned_accuracy']:.3f}")


def _write_report(out: Path, seed: int, cfg: RealZooConfig, h: str, timings: dict[str, float], tasks: dict[str, dict]) -> None:
    rep = {
        "recipe_hash": h,
        "seed": seed,
        "threads": cfg.threads,
        "build_seconds": timings,
        "base_accuracy_is": "linear probe: the pretrained Silero VAD frozen + the task head trained on its L2-normalised LSTM features",
        "tasks": tasks,
        "mean": {k: float(np.mean([r[k] for r in tasks.values()])) for k in ("base_accuracy", "finetuned_accuracy")},
    }
    atomic_write(str(out / "zoo_report.json"), json.dumps(rep, indent=2).encode())


def _write_description(out: Path, seed: int, cfg: RealZooConfig, h: str) -> None:
    """``demo.json`` (the format :func:`tswitch_ray.eval.evaluate.load_demo` reads)."""
    info = {
        "name": ZOO_NAME,
        "recipe_hash": h,
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "config": asdict(cfg),
        "adapter": {"kind": "silero_vad", "heads": "heads", "tasks": list(cfg.tasks)},
        "model_name": MODEL_NAME,
        "key_layout": "the silero-vad package's own keys (stft_conv.*, conv1-4.*, lstm_cell.*, final_conv.*)",
        "manifest": "zoo.yaml",
        "base": "base.safetensors",
        "pretraining": "none here: the base is the silero-vad wheel's pretrained 16 kHz voice-activity model",
        "tasks": {
            t: {
                "checkpoint": f"tasks/{t}.safetensors",
                "head": f"heads/{t}.safetensors",
                "eval": f"data/{t}/eval.parquet",
                "train": f"data/{t}/train.parquet",
                "classes": list(_tasks.task_info(t).classes),
                "real_data": True,
                "source": _tasks.task_info(t).source + f"; {SIDE}x{SIDE} grayscale read row by row as a {SIDE * SIDE}-sample signal",
                "split": _tasks.task_info(t).split_rule,
            }
            for t in cfg.tasks
        },
        "report": "zoo_report.json",
    }
    atomic_write(str(out / "demo.json"), json.dumps(info, indent=2).encode())


def _write_manifest(out: Path, cfg: RealZooConfig, h: str) -> Path:
    return write_zoo_manifest(out, ZOO_NAME, cfg.tasks,
                              f"tswitch real-model zoo (recipe {h}): silero-vad's pretrained network fine-tuned here; see demo.json")
