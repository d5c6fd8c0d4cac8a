"""The demo zoo recipe at a tiny size: determinism, disjoint splits, output layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq

from tswitch_ray.eval import _tasks
from tswitch_ray.eval.demo_zoo import DemoZooConfig, build_demo_zoo
from tswitch_ray.zoo import load_zoo

TINY = DemoZooConfig(tasks=("digits", "glyphs", "signs"), width=32, layers=2, heads=2, embed_dim=16,
                     n_train=64, n_eval=32, n_unlabeled=16, n_pretrain=64, pretrain_steps=2, pretrain_batch=16,
                     probe_steps=5, finetune_steps=2, finetune_batch=8)


def _digest(path: Path) -> str:
    """Tensor bytes + metadata. Not the raw file: safetensors writes its header's
    metadata map in hash order, which varies between calls."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        h.update(json.dumps(f.metadata(), sort_keys=True).encode())
        for k in sorted(f.keys()):
            h.update(k.encode() + f.get_tensor(k).numpy().tobytes())
    return h.hexdigest()


def test_same_seed_same_bytes_and_layout(tmp_path):
    a = build_demo_zoo(tmp_path / "a", seed=0, config=TINY)
    b = build_demo_zoo(tmp_path / "b", seed=0, config=TINY)
    ra, rb = a.parent, b.parent
    for rel in ["base.safetensors"] + [f"tasks/{t}.safetensors" for t in TINY.tasks] + [f"heads/{t}.safetensors" for t in TINY.tasks]:
        assert _digest(ra / rel) == _digest(rb / rel), rel
    for t in TINY.tasks:
        for split in ("eval", "train"):
            assert (ra / "data" / t / f"{split}.parquet").exists()
    report = json.loads((ra / "zoo_report.json").read_text())
    for t in TINY.tasks:
        assert 0.0 <= report["tasks"][t]["base_accuracy"] <= 1.0
        assert 0.0 <= report["tasks"][t]["finetuned_accuracy"] <= 1.0
    assert (ra / "demo.json").exists()
    zoo = load_zoo(str(a))
    assert zoo is not None
    # cached: a second call with the same recipe returns without rebuilding
    mtime = (ra / "base.safetensors").stat().st_mtime_ns
    build_demo_zoo(tmp_path / "a", seed=0, config=TINY)
    assert (ra / "base.safetensors").stat().st_mtime_ns == mtime


def test_train_and_eval_share_no_image():
    for t in _tasks.TASK_NAMES:
        tr, _ = _tasks.generate(t, "train", 200, 0, 32)
        ev, _ = _tasks.generate(t, "eval", 100, 0, 32)
        seen = {x.tobytes() for x in tr}
        assert not any(x.tobytes() in seen for x in ev), t
        again, _ = _tasks.generate(t, "eval", 100, 0, 32)
        assert (again == ev).all(), t
    pre, _ = _tasks.generate_pretrain(100, 0, 32)
    pre2, _ = _tasks.generate_pretrain(100, 0, 32)
    assert (pre == pre2).all()


def test_written_parquet_rows(tmp_path):
    path = build_demo_zoo(tmp_path / "z", seed=1, config=TINY).parent
    assert pq.read_table(path / "data" / "digits" / "eval.parquet").num_rows == TINY.n_eval
    assert pq.read_table(path / "data" / "digits" / "train.parquet").num_rows == TINY.n_unlabeled
