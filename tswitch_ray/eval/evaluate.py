"""Score a model on a task's eval split; extract pre-classifier features; open the demo zoo.

These are the single-process building blocks the Ray evaluation runner calls
inside its tasks: rebuild a model from a state dict with the adapter, then
:func:`evaluate` it (or :func:`extract_features` for Auto-Switch's query set).
CUDA is used when present (``tswitch_ray.device.pick_device``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from tswitch_ray.device import pick_device
from tswitch_ray.errors import ZooError
from tswitch_ray.eval.adapters import ModelAdapter, adapter_from_spec, read_json
from tswitch_ray.eval.datasets import EvalDataset, open_eval_dataset
from tswitch_ray.io.fs import resolve_uri
from tswitch_ray.io.safetensors import read_safetensors


def _batches(adapter: ModelAdapter, dataset: EvalDataset, batch_size: int, num_classes: int | None, require_labels: bool, limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    for raw in dataset.batches(batch_size, num_classes=num_classes, require_labels=require_labels, limit=limit):
        yield adapter.collate(raw.items), raw.labels


@torch.inference_mode()
def evaluate(
    adapter: ModelAdapter,
    model: nn.Module,
    dataset: EvalDataset,
    task: str,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Top-1 accuracy of ``model`` + the task's head on ``dataset``.

    Moves ``model`` to the device (CUDA when present). Labels are checked
    against the head's class count. Returns ``{"task", "accuracy", "correct",
    "n", "seconds"}``; ``seconds`` is wall time including data decoding.
    """
    dev = pick_device(str(device) if device is not None else None)
    model.to(dev).eval()
    n_classes = adapter.num_classes(task)
    t0 = time.perf_counter()
    correct = n = 0
    for x, y in _batches(adapter, dataset, batch_size, n_classes, True, limit):
        logits = adapter.logits(model, x.to(dev), task)
        correct += int((logits.argmax(dim=-1).cpu() == y).sum())
        n += int(y.numel())
    if n == 0:
        raise ZooError(f"{dataset.uri}: the eval split of task {task!r} has no rows.")
    return {"task": task, "accuracy": correct / n, "correct": correct, "n": n, "seconds": time.perf_counter() - t0}


@torch.inference_mode()
def extract_features(
    adapter: ModelAdapter,
    model: nn.Module,
    dataset: EvalDataset,
    limit: int | None = 100,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Pre-classifier features ``[n, D]`` (float32, CPU) of the first ``limit`` rows; labels are not needed."""
    dev = pick_device(str(device) if device is not None else None)
    model.to(dev).eval()
    out = [adapter.features(model, x.to(dev)).float().cpu() for x, _ in _batches(adapter, dataset, batch_size, None, False, limit)]
    if not out:
        raise ZooError(f"{dataset.uri}: no rows to extract features from.")
    return torch.cat(out)


@torch.inference_mode()
def predict(
    adapter: ModelAdapter,
    model: nn.Module,
    dataset: EvalDataset,
    task: str,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits ``[n, C]`` (CPU) and labels (``None`` if the split has none) — for per-input routing methods."""
    dev = pick_device(str(device) if device is not None else None)
    model.to(dev).eval()
    logits, labels = [], []
    for x, y in _batches(adapter, dataset, batch_size, adapter.num_classes(task), False, limit):
        logits.append(adapter.logits(model, x.to(dev), task).float().cpu())
        if y is not None:
            labels.append(y)
    return torch.cat(logits), (torch.cat(labels) if labels else None)


# ---------------------------------------------------------------- demo zoo access


@dataclass
class DemoZoo:
    """What ``demo.json`` describes: the adapter and where every task's data lives."""

    root: str
    adapter: ModelAdapter
    tasks: list[str]
    manifest_uri: str
    base_uri: str
    task_uris: dict[str, str]
    eval_uris: dict[str, str]
    train_uris: dict[str, str]
    info: dict[str, Any]

    def eval_dataset(self, task: str) -> EvalDataset:
        return open_eval_dataset(self.eval_uris[task])

    def train_dataset(self, task: str) -> EvalDataset:
        return open_eval_dataset(self.train_uris[task])

    def state_dict(self, which: str = "base") -> dict[str, torch.Tensor]:
        """The base tower (``"base"``) or a task's fine-tuned tower, whole, as stored."""
        return read_safetensors(self.base_uri if which == "base" else self.task_uris[which])[0]


def load_demo(zoo_dir: str, storage_options: Mapping[str, Any] | None = None) -> DemoZoo:
    """Open a zoo folder written by :func:`tswitch_ray.eval.demo_zoo.build_demo_zoo` (or any folder with a ``demo.json``)."""
    uri = resolve_uri(zoo_dir, "demo.json")
    info = read_json(uri, storage_options)
    if "adapter" not in info or "tasks" not in info:
        raise ZooError(f"{uri}: demo description lacks 'adapter' or 'tasks'.")
    adapter = adapter_from_spec(info["adapter"], zoo_dir, storage_options)
    tasks = list(info["tasks"])
    t = info["tasks"]
    return DemoZoo(
        root=zoo_dir,
        adapter=adapter,
        tasks=tasks,
        manifest_uri=resolve_uri(zoo_dir, info.get("manifest", "zoo.yaml")),
        base_uri=resolve_uri(zoo_dir, info.get("base", "base.safetensors")),
        task_uris={k: resolve_uri(zoo_dir, v["checkpoint"]) for k, v in t.items()},
        eval_uris={k: resolve_uri(zoo_dir, v["eval"]) for k, v in t.items()},
        train_uris={k: resolve_uri(zoo_dir, v["train"]) for k, v in t.items()},
        info=info,
    )
