"""Per-input routing drivers: Auto-Switch (paper 000 eq. 8) and WEMoE / E-WEMoE (paper 002)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tswitch_ray.errors import ConfigError
from tswitch_ray.eval.adapters import LinearHead, OpenClipVisionAdapter
from tswitch_ray.eval.autoswitch_eval import evaluate_autoswitch, rebuild_state_dict
from tswitch_ray.eval.datasets import open_eval_dataset, write_image_parquet
from tswitch_ray.eval.evaluate import evaluate, extract_features
from tswitch_ray.eval.wemoe_eval import build_wemoe_model, evaluate_wemoe, find_mlp_paths
from tswitch_ray.methods.autoswitch import autoswitch_weights
from tswitch_ray.methods.base import merge_in_memory
from tswitch_ray.methods.task_arithmetic import TaskArithmetic
from tswitch_ray.methods.wemoe import WeightEnsemblingMLP

TASKS = ["a", "b", "c"]
N_CLASSES = 4
CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
    "quick_gelu": False,
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    heads = {t: LinearHead(torch.randn(N_CLASSES, 16)) for t in TASKS}
    adapter = OpenClipVisionAdapter(heads=heads, source="test", model_cfg=CFG)
    base = {"visual." + k: v.detach().clone() for k, v in adapter.template().state_dict().items()}
    task_sds = []
    for _ in TASKS:
        sd = {}
        for k, v in base.items():
            sd[k] = v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v.clone()
        task_sds.append(sd)
    root = tmp_path_factory.mktemp("routing")
    sets = {}
    for i, t in enumerate(TASKS):
        # each task has its own colour cast, so task clusters exist in feature space
        imgs = np.clip(rng.normal(60 + 70 * i, 40, size=(24, 16, 16, 3)), 0, 255).astype(np.uint8)
        imgs[..., i] = 255
        write_image_parquet(str(root / f"{t}.parquet"), imgs, rng.integers(0, N_CLASSES, 24))
        sets[t] = open_eval_dataset(str(root / f"{t}.parquet"))
    return adapter, base, task_sds, sets


def _switches(base, task_sds, keep=0.3):
    out = []
    for sd in task_sds:
        sw = {}
        for k, b in base.items():
            if not b.is_floating_point():
                continue
            tau = (sd[k] - b).float().flatten()
            thr = tau.abs().quantile(1 - keep) if tau.numel() > 1 else 0.0
            mask = tau.abs() > thr
            knob = float(tau[mask].pow(2).mean().sqrt()) if mask.any() else 0.0
            sw[k] = (mask, tau > 0, knob)
        out.append(sw)
    return out


def test_autoswitch_one_hot_equals_tswitch(zoo):
    adapter, base, task_sds, sets = zoo
    sw = _switches(base, task_sds)
    # query set = the eval inputs themselves: with k = 1 every input finds itself
    res = evaluate_autoswitch(adapter, base, sw, TASKS, sets, sets, examples_per_task=24, k=1, batch_size=10, device="cpu")
    assert res["k"] == 1 and res["examples_per_task"] == 24 and res["query_size"] == 72
    for i, t in enumerate(TASKS):
        r = res["per_task"][t]
        assert r["routing_hit_rate"] == 1.0
        assert r["models_built"] == 1  # one-hot weights: the task's own T-Switch model, built once
        onehot = [1.0 if j == i else 0.0 for j in range(len(TASKS))]
        tswitch_model = adapter.build(rebuild_state_dict(base, sw, onehot))
        ref = evaluate(adapter, tswitch_model, sets[t], t, batch_size=10, device="cpu")
        assert r["accuracy"] == ref["accuracy"] and r["n"] == ref["n"] == 24
    assert res["average"] == pytest.approx(np.mean([res["per_task"][t]["accuracy"] for t in TASKS]))
    # the Ray runner scores one task per call: only that task's eval split, every task's query set
    one = evaluate_autoswitch(adapter, base, sw, TASKS, {"b": sets["b"]}, sets, examples_per_task=24, k=1, device="cpu")
    assert list(one["per_task"]) == ["b"] and one["per_task"]["b"]["accuracy"] == res["per_task"]["b"]["accuracy"]
    assert one["query_bytes"] == 72 * 16 * 4
    assert res["throughput_ratio"] > 0 and res["seconds"] > 0


def test_autoswitch_rebuilds_at_most_distinct_weight_vectors(zoo):
    adapter, base, task_sds, sets = zoo
    sw = _switches(base, task_sds)
    m, k = 6, 5
    # query rows 0..5 of every task, eval rows come from the whole split: mixed neighbourhoods
    res = evaluate_autoswitch(adapter, base, sw, TASKS, sets, sets, examples_per_task=m, k=k, batch_size=8,
                              device="cpu", feature_model="base", cache_size=64)
    fmodel = adapter.build(base)
    q = torch.cat([extract_features(adapter, fmodel, sets[t], limit=m) for t in TASKS])
    qid = torch.arange(len(TASKS)).repeat_interleave(m)
    distinct = set()
    for t in TASKS:
        w = autoswitch_weights(q, qid, extract_features(adapter, fmodel, sets[t], limit=None), k=k, n_tasks=3)
        distinct |= {tuple(r) for r in w.tolist()}
    built = sum(r["models_built"] for r in res["per_task"].values())
    assert built == res["models_built"] == len(distinct)  # big cache: one rebuild per distinct vector
    assert sum(r["groups"] for r in res["per_task"].values()) >= built
    small = evaluate_autoswitch(adapter, base, sw, TASKS, sets, sets, examples_per_task=m, k=k, batch_size=8,
                                device="cpu", feature_model="base", cache_size=1)
    assert small["models_built"] >= built
    for t in TASKS:  # the cache changes the cost, never the result
        assert small["per_task"][t]["accuracy"] == res["per_task"][t]["accuracy"]
    # averaging over the batch: one weight vector per batch
    avg = evaluate_autoswitch(adapter, base, sw, TASKS, sets, sets, examples_per_task=m, k=k, batch_size=8,
                              device="cpu", average_over_batch=True, group_window=8)
    assert all(r["groups"] == 3 for r in avg["per_task"].values())  # 24 rows / 8 per batch, grouped per batch
    with pytest.raises(ConfigError, match="k must be"):
        evaluate_autoswitch(adapter, base, sw, TASKS, sets, sets, examples_per_task=2, k=7, device="cpu")


def test_autoswitch_grouping_across_batches_keeps_every_prediction(zoo):
    """Grouping by weight vector over a window of batches (the default) makes fewer forward passes and
    predicts exactly what grouping inside each batch (``group_window`` = the batch size) predicts."""
    adapter, base, task_sds, sets = zoo
    sw = _switches(base, task_sds)

    class Recording(OpenClipVisionAdapter):  # the real adapter; records every pass's inputs and predictions
        passes: list = []

        def logits(self, model, x, task):
            out = super().logits(model, x, task)
            self.passes.append((model, task, x.sum(dim=(1, 2, 3)).tolist(), out.argmax(dim=-1).tolist()))
            return out

    runs = {}
    for window in (8, 1024):
        rec = Recording(heads=adapter.heads, source="test", model_cfg=CFG)
        rec.passes = []
        res = evaluate_autoswitch(rec, base, sw, TASKS, sets, sets, examples_per_task=6, k=5, batch_size=8,
                                  device="cpu", feature_model="base", group_window=window)
        plain = rec.passes[0][0]  # the throughput reference runs first: the fixed feature model
        res["predictions"] = {(t, round(key, 3)): p for model, t, keys, preds in rec.passes if model is not plain
                              for key, p in zip(keys, preds, strict=True)}
        runs[window] = res
    per_batch, windowed = runs[8], runs[1024]
    assert sum(r["groups"] for r in windowed["per_task"].values()) < sum(r["groups"] for r in per_batch["per_task"].values())
    assert len(windowed["predictions"]) == 3 * 24 and windowed["predictions"] == per_batch["predictions"]
    for t in TASKS:
        a, b = per_batch["per_task"][t], windowed["per_task"][t]
        assert (a["accuracy"], a["n"], a["routing_hit_rate"]) == (b["accuracy"], b["n"], b["routing_hit_rate"])


def test_wemoe_at_init_equals_task_arithmetic(zoo):
    adapter, base, task_sds, sets = zoo
    model, mlps = build_wemoe_model(adapter, base, task_sds, init_lambda=0.3, router_init_std=0.0)
    assert list(mlps) == ["transformer.resblocks.0.mlp", "transformer.resblocks.1.mlp"]
    ta = adapter.build(merge_in_memory(TaskArithmetic(scale=0.3), base, task_sds))
    x = adapter.collate(next(sets["a"].batches(8)).items)
    with torch.no_grad():
        for t in TASKS:
            torch.testing.assert_close(adapter.logits(model, x, t), adapter.logits(ta, x, t), atol=1e-4, rtol=1e-4)
    res = evaluate_wemoe(adapter, base, task_sds, TASKS, sets, sets, tta_steps=0, router_init_std=0.0, device="cpu")
    assert res["tta_steps"] == 0 and res["variant"] == "wemoe" and res["keep_fraction"] is None
    for t in TASKS:
        ref = evaluate(adapter, ta, sets[t], t, device="cpu")
        assert res["per_task"][t]["accuracy"] == ref["accuracy"] and res["per_task"][t]["n"] == 24


def test_wemoe_tta_reduces_entropy(zoo):
    adapter, base, task_sds, sets = zoo
    calls = []
    res = evaluate_wemoe(adapter, base, task_sds, TASKS, sets, sets, tta_steps=24, lr=1e-2, batch_size=8,
                         device="cpu", measure_entropy=True, progress=lambda s, n: calls.append((s, n)))
    assert calls[-1] == (24, 24) and len(res["tta_losses"]) == 24
    assert res["entropy_after"] < res["entropy_before"]
    assert res["n_routers"] == 2


def test_ewemoe_shares_one_router_and_prunes(zoo):
    adapter, base, task_sds, sets = zoo
    model, mlps = build_wemoe_model(adapter, base, task_sds, variant="e-wemoe", keep_fraction=0.1)
    routers = {id(m.router) for m in mlps.values()}
    assert len(routers) == 1
    stacked = mlps["transformer.resblocks.0.mlp"].tv__c_fc__weight  # [T, out, in]
    nz = (stacked[0] != 0).sum().item()
    assert nz == round(0.1 * stacked[0].numel())
    res = evaluate_wemoe(adapter, base, task_sds, TASKS, sets, sets, variant="e-wemoe", tta_steps=3,
                         batch_size=8, device="cpu", limit=8)
    assert res["n_routers"] == 1 and res["keep_fraction"] == 0.1 and res["variant"] == "e-wemoe"
    assert all(r["n"] == 8 for r in res["per_task"].values())


class _MLPFreeAdapter:
    kind = "toy"

    def build(self, state_dict):
        return nn.Sequential(nn.Linear(4, 4))

    def load(self, model, state_dict):
        return model


def test_unknown_mlp_layout_is_a_clear_error(zoo):
    with pytest.raises(ConfigError, match="Sequential"):
        find_mlp_paths(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ConfigError, match="no Transformer MLP found in model class Sequential"):
        build_wemoe_model(_MLPFreeAdapter(), {}, [{}])
    with pytest.raises(ConfigError, match="variant"):
        build_wemoe_model(_MLPFreeAdapter(), {}, [{}], variant="moe")
    assert isinstance(WeightEnsemblingMLP, type)


class _CountingAdapter:
    """Delegates to a real adapter; records the rows sent through ``features`` and every ``logits`` output per task."""

    def __init__(self, inner):
        self.inner = inner
        self.feature_rows = 0
        self.builds = 0
        self.logits_by_task: dict[str, list[torch.Tensor]] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def build(self, state_dict):
        self.builds += 1
        return self.inner.build(state_dict)

    def features(self, model, x):
        self.feature_rows += int(x.shape[0])
        return self.inner.features(model, x)

    def logits(self, model, x, task):
        out = self.inner.logits(model, x, task)
        self.logits_by_task.setdefault(task, []).append(out.clone())
        return out


class _CountingDataset:
    """Delegates to a real eval dataset; counts ``batches`` calls (one per pass over the split)."""

    def __init__(self, inner):
        self.inner = inner
        self.passes = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def batches(self, *args, **kwargs):
        self.passes += 1
        return self.inner.batches(*args, **kwargs)


def test_autoswitch_one_call_for_all_tasks_equals_one_call_per_task(zoo):
    adapter, base, task_sds, sets = zoo
    sw = _switches(base, task_sds)
    m, k = 6, 5  # mixed neighbourhoods: several weight groups per batch
    opts = dict(examples_per_task=m, k=k, batch_size=8, device="cpu", cache_size=2)

    all_ad = _CountingAdapter(adapter)
    all_query = {t: _CountingDataset(sets[t]) for t in TASKS}
    together = evaluate_autoswitch(all_ad, base, sw, TASKS, sets, all_query, **opts)
    assert list(together["per_task"]) == TASKS
    # the query set is extracted once per call: one pass over each query split, m feature rows per task,
    # plus one feature pass per eval row (72); one build for the averaged feature model + cached rebuilds
    assert [all_query[t].passes for t in TASKS] == [1, 1, 1]
    assert all_ad.feature_rows == len(TASKS) * m + len(TASKS) * 24
    assert all_ad.builds <= 1 + 2  # feature model + at most cache_size rebuilt modules, reused via load

    built = 0
    for t in TASKS:
        one_ad = _CountingAdapter(adapter)
        alone = evaluate_autoswitch(one_ad, base, sw, TASKS, {t: sets[t]}, sets, **opts)
        assert one_ad.feature_rows == len(TASKS) * m + 24  # each per-task call pays the whole query set again
        a, b = together["per_task"][t], alone["per_task"][t]
        assert (a["accuracy"], a["n"], a["groups"], a["routing_hit_rate"]) == \
               (b["accuracy"], b["n"], b["groups"], b["routing_hit_rate"])
        # every forward pass for task t (fixed-model reference and grouped rebuilt models) is bit-identical
        assert len(all_ad.logits_by_task[t]) == len(one_ad.logits_by_task[t])
        for x, y in zip(all_ad.logits_by_task[t], one_ad.logits_by_task[t], strict=True):
            assert torch.equal(x, y)
        built += alone["models_built"]
        same = evaluate_autoswitch(adapter, base, sw, TASKS, sets, sets, eval_tasks=[t], **opts)
        assert same["per_task"][t] == alone["per_task"][t]
    assert together["models_built"] <= built  # the cache is shared across tasks in one call
    assert together["query_size"] == len(TASKS) * m


def test_wemoe_forced_token_layout_applies_to_every_mlp(zoo):
    adapter, base, task_sds, sets = zoo
    forced, _ = build_wemoe_model(adapter, base, task_sds, batch_first=True)  # open_clip blocks are batch-first
    detected, mlps = build_wemoe_model(adapter, base, task_sds)
    assert len(mlps) == 2 and all(m.batch_first for m in mlps.values())
    x = adapter.collate(next(sets["a"].batches(8)).items)
    with torch.no_grad():
        assert torch.equal(adapter.logits(forced, x, "a"), adapter.logits(detected, x, "a"))
