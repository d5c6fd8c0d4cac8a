"""``tswitch eval`` of a zoo whose tasks are PEFT LoRA adapters of a sequence classifier.

The base is a tiny ``BertForSequenceClassification`` saved with
``save_pretrained``; each task is a peft adapter of it (LoRA on query/value,
the classifier in ``modules_to_save``) written by peft's ``save_pretrained``,
with no ``config.json`` of its own. The Individual row must be what peft's own
``merge_and_unload()`` model scores on the same rows, and the adapter's
Individual model must give peft's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tswitch_ray.distributed.eval_runner import run_eval  # noqa: E402
from tswitch_ray.errors import ConfigError, ZooError  # noqa: E402
from tswitch_ray.eval.adapters import adapter_from_spec  # noqa: E402
from tswitch_ray.eval.config import EvalConfig, MethodSpec  # noqa: E402
from tswitch_ray.eval.datasets import write_token_parquet  # noqa: E402
from tswitch_ray.eval.weights import read_checkpoint  # noqa: E402
from tswitch_ray.tracking import TrackingConfig  # noqa: E402
from tswitch_ray.zoo import load_zoo  # noqa: E402

VOCAB, CLS, LENGTH, LABELS = 40, 2, 8, 3
TASKS = ("t1", "t2")


def _config() -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=16, num_labels=LABELS)


def _rows(seed: int, n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, VOCAB, (n, LENGTH), generator=g)
    return torch.cat([torch.full((n, 1), CLS), words], dim=1), words[:, 0] % LABELS


def _peft_task(base_dir: Path, out: Path, seed: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write one adapter with peft; its logits on ``ids`` from peft's model, and from its ``merge_and_unload()``."""
    model = transformers.BertForSequenceClassification.from_pretrained(str(base_dir)).eval()
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                          modules_to_save=["classifier"])
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # as training would: B ≠ 0, and a classifier of its own
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(out))
    pm.eval()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = pm(input_ids=ids, attention_mask=mask).logits
        merged = pm.merge_and_unload().eval()(input_ids=ids, attention_mask=mask).logits
    return logits, merged


def _zoo(tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(_config()).save_pretrained(str(tmp_path / "base"))
    ref = {}
    for i, task in enumerate(TASKS):
        ids, labels = _rows(seed=10 + i)
        write_token_parquet(str(tmp_path / f"{task}.parquet"), ids.tolist(), labels.tolist())
        logits, merged = _peft_task(tmp_path / "base", tmp_path / task, seed=1 + i, ids=ids)
        ref[task] = {"ids": ids, "labels": labels, "logits": logits, "merged": merged}
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({"name": "z", "base": "base", "exclude": ["classifier.*"],
                                                      "tasks": [{"name": t, "uri": t} for t in TASKS]}))
    return ref


def _eval_config(tmp_path: Path, kind: str, work: str) -> EvalConfig:
    return EvalConfig(zoo=str(tmp_path / "zoo.yaml"), work_dir=str(tmp_path / work), executor="local",
                      adapter={"kind": kind, "base": "base", "tasks": {t: t for t in TASKS}},
                      data={t: {"eval": str(tmp_path / f"{t}.parquet")} for t in TASKS},
                      methods=[MethodSpec(method="individual"), MethodSpec(method="ta", options={"scale": 0.3})],
                      tracking=TrackingConfig(enabled=False))


def test_eval_of_peft_adapter_tasks_matches_peft(tmp_path):
    ref = _zoo(tmp_path)
    assert not (tmp_path / "t1" / "config.json").exists()  # an adapter folder: the base's config is the task's
    saved = json.loads((tmp_path / "t1" / "adapter_config.json").read_text())
    assert "classifier" in saved["modules_to_save"]

    run_eval(_eval_config(tmp_path, "hf_sequence_classifier", "work"), show_progress=False)
    summary = {s["method"]: s for s in json.loads((tmp_path / "work" / "summary.json").read_text())}
    assert set(summary) == {"individual", "ta"}
    for task in TASKS:
        r = ref[task]
        expected = float((r["merged"].argmax(-1) == r["labels"]).float().mean())
        assert summary["individual"]["per_task"][task] == pytest.approx(expected, abs=1e-9)
        assert 0 <= summary["ta"]["per_task"][task] <= 1
    table = pq.read_table(str(tmp_path / "t1.parquet"))
    assert len(table) == len(ref["t1"]["ids"])

    # The adapter's Individual model (θ0 + τ of the backbone, the trained head) gives peft's logits.
    adapter = adapter_from_spec({"kind": "hf_sequence_classifier", "base": "base", "tasks": {t: t for t in TASKS}},
                                str(tmp_path))
    zoo = load_zoo(str(tmp_path / "zoo.yaml"))
    for task in TASKS:
        assert adapter.num_classes(task) == LABELS
        model = adapter.build(read_checkpoint(zoo, task)).eval()
        with torch.no_grad():
            got = adapter.logits(model, ref[task]["ids"], task)
        torch.testing.assert_close(got, ref[task]["logits"], atol=1e-5, rtol=0)
    # The heads are the adapters' own (modules_to_save), not the base's: the tasks' logits differ.
    assert (ref["t1"]["logits"] - ref["t2"]["logits"]).abs().max() > 0.1


def test_eval_refuses_adapter_tasks_of_an_unsupported_kind_before_any_merge(tmp_path):
    _zoo(tmp_path)
    with pytest.raises(ConfigError, match=r"base/config\.json: model_type 'bert' is not supported by the "
                                          r"'hf_image_classifier' adapter"):
        run_eval(_eval_config(tmp_path, "hf_image_classifier", "wrong"), show_progress=False)
    assert not (tmp_path / "wrong").exists()  # nothing merged, nothing written


def test_image_classifier_adapter_tasks_give_peft_logits(tmp_path):
    """The image kind: a ConvNeXt classifier's adapters (LoRA on its pointwise linears), heads in modules_to_save,
    logits as peft's model gives them.

    ConvNeXt, because transformers 5 saves its module names as they are; ViT, Swin and BEiT modules are renamed
    at load (``q_proj`` in the model, ``attention.query`` in the file), and a peft adapter carries the model's names.
    """
    cfg = transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=LABELS)
    torch.manual_seed(0)
    transformers.ConvNextForImageClassification(cfg).save_pretrained(str(tmp_path / "base"))
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ref = {}
    for i, task in enumerate(TASKS):
        model = transformers.ConvNextForImageClassification.from_pretrained(str(tmp_path / "base")).eval()
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["pwconv1", "pwconv2"],
                                                        modules_to_save=["classifier"]))
        g = torch.Generator().manual_seed(1 + i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
                elif "modules_to_save" in name:
                    p.add_(torch.randn(p.shape, generator=g))
        pm.save_pretrained(str(tmp_path / task))
        with torch.no_grad():
            ref[task] = pm.eval()(pixel_values=pixels).logits
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({"name": "v", "base": "base", "exclude": ["classifier.*"],
                                                      "tasks": [{"name": t, "uri": t} for t in TASKS]}))
    adapter = adapter_from_spec({"kind": "hf_image_classifier", "base": "base", "tasks": {t: t for t in TASKS}},
                                str(tmp_path))
    zoo = load_zoo(str(tmp_path / "zoo.yaml"))
    for task in TASKS:
        model = adapter.build(read_checkpoint(zoo, task)).eval()
        with torch.no_grad():
            torch.testing.assert_close(adapter.logits(model, pixels, task), ref[task], atol=1e-5, rtol=0)
    assert (ref["t1"] - ref["t2"]).abs().max() > 0.1


def test_adapter_task_on_a_bare_base_is_a_clear_error(tmp_path):
    """A base saved as the bare BertModel has no head for an adapter task to read: refused naming both folders."""
    torch.manual_seed(0)
    transformers.BertModel(_config(), add_pooling_layer=False).save_pretrained(str(tmp_path / "base"))
    model = transformers.BertModel.from_pretrained(str(tmp_path / "base"))
    peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value"])).save_pretrained(str(tmp_path / "t1"))
    with pytest.raises(ZooError, match=r"t1: a PEFT adapter task is read against the base .*base, whose checkpoint has "
                                       r"no bert\.\* tensors \(a bare base model\); save the base as the \*For\*Classification"):
        adapter_from_spec({"kind": "hf_sequence_classifier", "base": "base", "tasks": {"t1": "t1"}}, str(tmp_path))
