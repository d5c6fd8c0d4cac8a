"""The offline demo zoo: a tiny open_clip ViT pretrained here, then fine-tuned on 8 tasks.

No hub works on these machines, so the demo makes what a user with a real zoo
has, by real training on CPU:

1. **Data** — the 8 tasks of :mod:`tswitch_ray.eval._tasks` (5 from package
   data: sklearn digits, scikit-image textures and photos, matplotlib fonts;
   3 generated), each with disjoint train/eval material.
2. **Pretraining** ("the CLIP stage") — a custom open_clip ViT (32x32 input,
   patch 8, width 64, 3 layers, 4 heads, output dim 64 by default) trained
   on a generic symbol set (:func:`_tasks.generate_pretrain`: letters and
   signs, no digits and none of the glyphs task's letters, supervised) plus
   the mixture of all tasks' *training* images with a label-free objective:
   predict which source an image comes from (domain, one way per task) and
   by how much it was rotated (0/90/180/270 degrees). No task labels are
   seen, so the base tower is generic, as a CLIP tower is for the papers'
   8 tasks.
3. **Heads** — per task, a linear probe on the frozen, L2-normalised base
   features (the analogue of the papers' zero-shot heads). The base model's
   accuracy in ``zoo_report.json`` is this linear probe.
4. **Fine-tuning** — per task, the whole tower from the base weights, with the
   task head frozen (``head_mode="frozen_probe"``, the protocol of the
   task-vectors paper: the merged backbone is scored with the same heads), or
   trained jointly from the probe (``head_mode="joint"``).

Written files (``out_dir``): ``zoo.yaml`` (the zoo manifest of README.md),
``base.safetensors`` and ``tasks/<task>.safetensors`` (the tower as
``visual.*`` keys), ``heads/<task>.safetensors`` (:class:`LinearHead`),
``data/<task>/eval.parquet`` and ``data/<task>/train.parquet`` (a small held-out
training sample for test-time methods: Auto-Switch query sets, WEMoE
adaptation), ``demo.json`` (adapter spec + file map + recipe hash) and
``zoo_report.json`` (accuracies, timings). ``zoo.yaml`` and ``demo.json`` are
written last, so a build that died midway is never taken for a cached one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from tswitch_ray.errors import ConfigError
from tswitch_ray.eval import _tasks
from tswitch_ray.eval.adapters import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, LinearHead, OpenClipVisionAdapter, load_head, save_head
from tswitch_ray.eval.datasets import open_eval_dataset, write_image_parquet
from tswitch_ray.eval.evaluate import evaluate
from tswitch_ray.io.atomic import atomic_write, exists, read_bytes, remove_tree
from tswitch_ray.io.safetensors import save_safetensors

RECIPE_VERSION = 3
ZOO_NAME = "tswitch-demo"
MODEL_NAME = "tswitch-demo-vit"


@dataclass(frozen=True)
class DemoZooConfig:
    """Every knob of the recipe; its hash (with the seed) identifies a cached build."""

    tasks: tuple[str, ...] = _tasks.TASK_NAMES
    image_size: int = 32
    patch_size: int = 8
    width: int = 64
    layers: int = 3
    heads: int = 4
    embed_dim: int = 64
    pool_type: str = "tok"  # open_clip's pooling: "tok" (CLS, as CLIP) or "avg"
    n_train: int = 1536  # per task: pretraining pool, probe and fine-tuning data
    n_eval: int = 400
    n_unlabeled: int = 128  # written as data/<task>/train.parquet
    n_pretrain: int = 4000  # generic symbol images (tasks.generate_pretrain)
    pretrain_steps: int = 400
    pretrain_batch: int = 128
    pretrain_lr: float = 2e-3
    probe_steps: int = 300
    probe_lr: float = 0.05
    finetune_steps: int = 300
    finetune_batch: int = 64
    finetune_lr: float = 2e-3
    weight_decay: float = 0.05
    head_mode: str = "frozen_probe"
    # One thread: this tower's matmuls are too small to gain from a second one, and
    # on a busy machine OpenMP spin-waits multiplied CPU time by up to 20x (measured).
    threads: int = 1

    def model_config(self) -> dict:
        """The open_clip model config (JSON format of open_clip's model_configs)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "layers": self.layers,
                "width": self.width,
                "head_width": self.width // self.heads,
                "patch_size": self.patch_size,
                "mlp_ratio": 4.0,
                "pool_type": self.pool_type,
            },
            "quick_gelu": False,
        }

    def validate(self) -> None:
        for t in self.tasks:
            _tasks.task_info(t)
        if self.head_mode not in ("frozen_probe", "joint"):
            raise ConfigError(f"demo zoo head_mode {self.head_mode!r} is unknown; use 'frozen_probe' or 'joint'.")
        if self.width % self.heads or self.image_size % self.patch_size:
            raise ConfigError("demo zoo: width must be divisible by heads and image_size by patch_size.")
        if not self.tasks:
            raise ConfigError("demo zoo: at least one task is needed.")


def recipe_hash(config: DemoZooConfig, seed: int) -> str:
    blob = json.dumps({"version": RECIPE_VERSION, "seed": seed, "config": asdict(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- training pieces


def _to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, S, S, 3]`` -> normalised float ``[N, 3, S, S]`` (the adapter's collate, vectorised)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 10 % of steps, then cosine to zero."""
    warm = max(1, total // 10)
    if step < warm:
        return peak * (step + 1) / warm
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _pretrain(tower: nn.Module, pools: list[torch.Tensor], sym_x: torch.Tensor, sym_y: torch.Tensor, cfg: DemoZooConfig, gen: torch.Generator) -> list[float]:
    """Generic pretraining: symbol classification + domain and rotation prediction.

    Each step draws half its batch from the generic symbol set (supervised,
    :func:`_tasks.generate_pretrain`) and half from the unlabeled mixture of
    the tasks' training pools (which source? rotated by how much?). No task
    label is ever seen.
    """
    n_sym = int(sym_y.max()) + 1
    sym_head = nn.Linear(cfg.embed_dim, n_sym)
    domain_head = nn.Linear(cfg.embed_dim, len(pools))
    rot_head = nn.Linear(cfg.embed_dim, 4)
    params = list(tower.parameters()) + [p for h in (sym_head, domain_head, rot_head) for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr, weight_decay=cfg.weight_decay)
    x_all = torch.cat(pools)
    d_all = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(pools)])
    half = max(1, cfg.pretrain_batch // 2)
    losses = []
    tower.train()
    for step in range(cfg.pretrain_steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.pretrain_steps, cfg.pretrain_lr)
        si = torch.randint(len(sym_x), (half,), generator=gen)
        idx = torch.randint(len(x_all), (half,), generator=gen)
        x, d = x_all[idx], d_all[idx]
        r = torch.randint(4, (half,), generator=gen)
        for k in (1, 2, 3):
            m = r == k
            x[m] = torch.rot90(x[m], k, dims=(2, 3))
        f = tower(torch.cat([sym_x[si], x]))
        fs, ft = f[:half], f[half:]
        ce = nn.functional.cross_entropy
        loss = ce(sym_head(fs), sym_y[si]) + ce(domain_head(ft), d) + ce(rot_head(ft), r)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    tower.eval()
    return losses


@torch.inference_mode()
def _features(tower: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    tower.eval()
    return torch.cat([tower(x[i : i + batch]) for i in range(0, len(x), batch)])


def _train_probe(feats: torch.Tensor, labels: torch.Tensor, n_classes: int, cfg: DemoZooConfig, classes: list[str]) -> LinearHead:
    """Full-batch multinomial logistic regression on L2-normalised frozen features."""
    f = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w = torch.zeros(n_classes, f.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=cfg.probe_lr)
    for _ in range(cfg.probe_steps):
        loss = nn.functional.cross_entropy(f @ w.T + b, labels) + 1e-4 * (w**2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return LinearHead(w.detach(), b.detach(), normalize=True, classes=classes)


def _finetune(base: nn.Module, head: LinearHead, x: torch.Tensor, y: torch.Tensor, cfg: DemoZooConfig, gen: torch.Generator) -> tuple[nn.Module, LinearHead, list[float]]:
    tower = copy.deepcopy(base)
    head = copy.deepcopy(head)
    params = list(tower.parameters())
    if cfg.head_mode == "joint":
        for p in (head.weight, head.bias):
            p.requires_grad_(True)
        params += [head.weight, head.bias]
    opt = torch.optim.AdamW(params, lr=cfg.finetune_lr, weight_decay=cfg.weight_decay)
    tower.train()
    losses = []
    for step in range(cfg.finetune_steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.finetune_steps, cfg.finetune_lr)
        idx = torch.randint(len(x), (cfg.finetune_batch,), generator=gen)
        loss = nn.functional.cross_entropy(head(tower(x[idx])), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    tower.eval()
    for p in (head.weight, head.bias):
        p.requires_grad_(False)
    return tower, head, losses


def _visual_state(tower: nn.Module) -> dict[str, torch.Tensor]:
    return {"visual." + k: v.detach().clone().contiguous() for k, v in tower.state_dict().items()}


# ---------------------------------------------------------------- build


def _cached(out: Path, h: str) -> bool:
    demo, manifest = str(out / "demo.json"), str(out / "zoo.yaml")
    if not (exists(demo) and exists(manifest)):
        return False
    try:
        info = json.loads(read_bytes(demo))
    except json.JSONDecodeError:
        return False
    if info.get("recipe_hash") != h:
        return False
    files = [info["base"]] + [p for t in info["tasks"].values() for p in (t["checkpoint"], t["eval"], t["train"], t["head"])]
    return all(exists(str(out / f)) for f in files)


def build_demo_zoo(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    force: bool = False,
    config: DemoZooConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build (or reuse) the demo zoo in ``out_dir``; returns the path of ``zoo.yaml``.

    Cached: when ``out_dir/zoo.yaml`` and ``demo.json`` exist with this
    recipe's hash (config + seed + recipe version) and all files are present,
    nothing is recomputed unless ``force``. Training uses ``config.threads``
    CPU threads (restored afterwards) and seeded generators only.
    """
    cfg = config or DemoZooConfig()
    cfg.validate()
    out = Path(out_dir)
    h = recipe_hash(cfg, seed)
    if not force and _cached(out, h):
        return out / "zoo.yaml"
    say = progress or (lambda msg: None)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # module init draws from the global RNG; fork_rng keeps the caller's state
            return _build(out, seed, cfg, h, say)
    finally:
        torch.set_num_threads(old_threads)


def _build(out: Path, seed: int, cfg: DemoZooConfig, h: str, say: Callable[[str], None]) -> Path:
    """The recipe's steps in order; every random draw comes from ``seed`` (the global RNG was seeded by the caller)."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    _clear_previous(out)
    with _timed(timings, "data"):
        train_x, train_y = _write_data(out, seed, cfg)
    say(f"data: {len(cfg.tasks)} tasks in {timings['data']:.1f}s")
    gen = torch.Generator().manual_seed(seed)  # shared by pretraining and every fine-tuning, in this order
    with _timed(timings, "pretrain"):
        base, base_sd, pre_losses = _pretrain_base(out, seed, cfg, h, train_x, gen)
    say(f"pretrain: {cfg.pretrain_steps} steps, loss {pre_losses[0]:.3f} -> {np.mean(pre_losses[-10:]):.3f}, {timings['pretrain']:.1f}s")
    with _timed(timings, "probe_and_finetune"):
        heads, towers, ft_losses = _probe_and_finetune(out, base, train_x, train_y, cfg, gen, say)
    with _timed(timings, "eval"):
        report_tasks = _measure(out, cfg, base_sd, heads, towers, say)
    timings["total"] = time.perf_counter() - t_start
    # CPU seconds of this process: what the 5-minute budget means on a shared machine, where wall time is noise.
    timings["cpu_total"] = time.process_time() - cpu_start
    _write_report(out, seed, cfg, h, timings, pre_losses, ft_losses, report_tasks)
    _write_description(out, seed, cfg, h)
    return _write_manifest(out, cfg, h)  # last: the marker of a complete zoo (see _cached)


@contextlib.contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    """Wall seconds of the block, recorded as ``timings[step]``."""
    t0 = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - t0


def _clear_previous(out: Path) -> None:
    """Remove the markers first (so a half-cleared folder is never taken for a zoo), then old task files."""
    for stale in ("zoo.yaml", "demo.json"):
        remove_tree(str(out / stale))
    for sub in ("tasks", "heads", "data"):
        remove_tree(str(out / sub))


def _write_data(out: Path, seed: int, cfg: DemoZooConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Step 1: every task's splits; the training images are returned as inputs, the held-out sample and eval split written."""
    train_x: dict[str, torch.Tensor] = {}
    train_y: dict[str, torch.Tensor] = {}
    for t in cfg.tasks:
        imgs, labels = _tasks.generate(t, "train", cfg.n_train + cfg.n_unlabeled, seed, cfg.image_size)
        train_x[t] = _to_input(imgs[: cfg.n_train])
        train_y[t] = torch.from_numpy(labels[: cfg.n_train])
        write_image_parquet(str(out / "data" / t / "train.parquet"), imgs[cfg.n_train :], labels[cfg.n_train :])
        ev_imgs, ev_labels = _tasks.generate(t, "eval", cfg.n_eval, seed, cfg.image_size)
        write_image_parquet(str(out / "data" / t / "eval.parquet"), ev_imgs, ev_labels)
    return train_x, train_y


def _pretrain_base(out: Path, seed: int, cfg: DemoZooConfig, h: str, train_x: dict[str, torch.Tensor], gen: torch.Generator) -> tuple[nn.Module, dict[str, torch.Tensor], list[float]]:
    """Step 2: the base tower, pretrained generically and written as ``base.safetensors``."""
    adapter = OpenClipVisionAdapter(heads={}, source=str(out), model_cfg=cfg.model_config())
    base = adapter.template()
    sym_imgs, sym_labels = _tasks.generate_pretrain(cfg.n_pretrain, seed, cfg.image_size)
    losses = _pretrain(base, [train_x[t] for t in cfg.tasks], _to_input(sym_imgs), torch.from_numpy(sym_labels), cfg, gen)
    base_sd = _visual_state(base)
    save_safetensors(base_sd, str(out / "base.safetensors"), metadata={"format": "pt", "model": MODEL_NAME, "recipe": h})
    return base, base_sd, losses


def _probe_and_finetune(
    out: Path, base: nn.Module, train_x: dict[str, torch.Tensor], train_y: dict[str, torch.Tensor], cfg: DemoZooConfig, gen: torch.Generator, say: Callable[[str], None]
) -> tuple[dict[str, LinearHead], dict[str, dict[str, torch.Tensor]], dict[str, list[float]]]:
    """Steps 3 and 4, per task: the linear probe on the frozen base, then the fine-tuned tower; both written."""
    heads: dict[str, LinearHead] = {}
    towers: dict[str, dict[str, torch.Tensor]] = {}
    ft_losses: dict[str, list[float]] = {}
    for t in cfg.tasks:
        info = _tasks.task_info(t)
        probe = _train_probe(_features(base, train_x[t]), train_y[t], len(info.classes), cfg, list(info.classes))
        tower, head, losses = _finetune(base, probe, train_x[t], train_y[t], cfg, gen)
        ft_losses[t] = losses
        towers[t] = _visual_state(tower)
        save_safetensors(towers[t], str(out / "tasks" / f"{t}.safetensors"), metadata={"format": "pt", "model": MODEL_NAME, "task": t})
        heads[t] = head
        save_head(str(out / "heads" / f"{t}.safetensors"), head)
        if cfg.head_mode == "joint":  # the base is scored with its own probe
            save_head(str(out / "heads" / "probe" / f"{t}.safetensors"), probe)
        say(f"finetune {t}: loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}")
    return heads, towers, ft_losses


def _measure(
    out: Path, cfg: DemoZooConfig, base_sd: dict[str, torch.Tensor], heads: dict[str, LinearHead], towers: dict[str, dict[str, torch.Tensor]], say: Callable[[str], None]
) -> dict[str, dict[str, float]]:
    """Step 5: accuracies through the real path: parquet -> adapter.collate -> built model -> head."""
    report_tasks: dict[str, dict[str, float]] = {}
    base_model = OpenClipVisionAdapter(heads={}, source=str(out), model_cfg=cfg.model_config()).build(base_sd)
    for t in cfg.tasks:
        ds = open_eval_dataset(str(out / "data" / t / "eval.parquet"))
        probe_heads = {t: heads[t]}
        if cfg.head_mode == "joint":
            probe_heads = {t: load_head(str(out / "heads" / "probe" / f"{t}.safetensors"))}
        base_ad = OpenClipVisionAdapter(heads=probe_heads, source=str(out), model_cfg=cfg.model_config())
        ft_ad = OpenClipVisionAdapter(heads={t: heads[t]}, source=str(out), model_cfg=cfg.model_config())
        acc_base = evaluate(base_ad, base_model, ds, t, device="cpu")["accuracy"]
        acc_ft = evaluate(ft_ad, ft_ad.build(towers[t]), ds, t, device="cpu")["accuracy"]
        report_tasks[t] = {"base_accuracy": acc_base, "finetuned_accuracy": acc_ft, "n_eval": len(ds), "n_classes": len(heads[t].classes or [])}
        say(f"eval {t}: base(probe) {acc_base:.3f}  finetuned {acc_ft:.3f}")
    return report_tasks


def _write_report(
    out: Path, seed: int, cfg: DemoZooConfig, h: str, timings: dict[str, float], pre_losses: list[float], ft_losses: dict[str, list[float]], report_tasks: dict[str, dict[str, float]]
) -> None:
    """``zoo_report.json``: accuracies, losses and timings of this build."""
    report = {
        "recipe_hash": h,
        "seed": seed,
        "threads": cfg.threads,
        "build_seconds": timings,
        "base_accuracy_is": "linear probe: base tower frozen + the task head trained on its L2-normalised features",
        "head_mode": cfg.head_mode,
        "pretrain_loss": {"first": pre_losses[0], "last10_mean": float(np.mean(pre_losses[-10:]))},
        "finetune_loss": {t: {"first": v[0], "last5_mean": float(np.mean(v[-5:]))} for t, v in ft_losses.items()},
        "tasks": report_tasks,
        "mean": {
            "base_accuracy": float(np.mean([r["base_accuracy"] for r in report_tasks.values()])),
            "finetuned_accuracy": float(np.mean([r["finetuned_accuracy"] for r in report_tasks.values()])),
        },
    }
    atomic_write(str(out / "zoo_report.json"), json.dumps(report, indent=2).encode())


def _task_files(cfg: DemoZooConfig) -> dict[str, dict]:
    """``demo.json``'s per-task entries: file map (relative to the zoo folder) and data provenance."""
    return {
        t: {
            "checkpoint": f"tasks/{t}.safetensors",
            "head": f"heads/{t}.safetensors",
            "eval": f"data/{t}/eval.parquet",
            "train": f"data/{t}/train.parquet",
            "classes": list(_tasks.task_info(t).classes),
            "real_data": _tasks.task_info(t).real,
            "source": _tasks.task_info(t).source,
            "split": _tasks.task_info(t).split_rule,
        }
        for t in cfg.tasks
    }


def _write_description(out: Path, seed: int, cfg: DemoZooConfig, h: str) -> None:
    """``demo.json``: the adapter spec, the file map and the recipe (see :func:`tswitch_ray.eval.evaluate.load_demo`)."""
    demo = {
        "name": ZOO_NAME,
        "recipe_hash": h,
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "config": asdict(cfg),
        "adapter": {"kind": "open_clip", "model": cfg.model_config(), "heads": "heads", "tasks": list(cfg.tasks), "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)},
        "model_name": MODEL_NAME,
        "key_layout": "visual.* (open_clip VisionTransformer state dict with a 'visual.' prefix)",
        "manifest": "zoo.yaml",
        "base": "base.safetensors",
        "tasks": _task_files(cfg),
        "pretraining": "generic symbol classification (letters/signs, no task classes) + domain (which task source) + rotation (0/90/180/270) prediction on the unlabeled mixture of all tasks' training images",
        "report": "zoo_report.json",
    }
    atomic_write(str(out / "demo.json"), json.dumps(demo, indent=2).encode())


def write_zoo_manifest(out: Path, name: str, tasks: Sequence[str], header: str) -> Path:
    """``zoo.yaml`` (the zoo manifest of README.md) of a zoo made here, under a ``# header`` line; returns its path."""
    manifest = {"name": name, "base": "base.safetensors", "tasks": [{"name": t, "uri": f"tasks/{t}.safetensors"} for t in tasks]}
    atomic_write(str(out / "zoo.yaml"), (f"# {header}\n" + yaml.safe_dump(manifest, sort_keys=False)).encode())
    return out / "zoo.yaml"


def _write_manifest(out: Path, cfg: DemoZooConfig, h: str) -> Path:
    return write_zoo_manifest(out, ZOO_NAME, cfg.tasks, f"tswitch demo zoo (recipe {h}); see demo.json and zoo_report.json")
