"""Zoos users actually have: per-task heads (``task_specific``), other key layouts (``prefix``/``rename``,
a detected prefix) and non-float buffers, with checkpoints written by transformers ``save_pretrained``
and ``torch.save``.

Every reconstructed task is loaded into its own class with strict loading; its task-specific tensors
and buffers must be the task's bit for bit, and its logits those of the switch approximation computed
independently (tests/test_build_reconstruct.py ``reference``) within fp tolerance.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_build_reconstruct import reference
from typer.testing import CliRunner

from tswitch_ray.artifacts import ArtifactReader
from tswitch_ray.cli import app
from tswitch_ray.distributed.build import BuildConfig, run_build
from tswitch_ray.errors import ArtifactError, ZooError
from tswitch_ray.reconstruct import reconstruct_task
from tswitch_ray.zoo import load_zoo
from tswitch_ray.zoo.keymap import (
    KeyRules,
    canonical_names,
    detect_prefix,
    looks_like_head,
    map_name,
    suggest_task_specific,
    unmap_name,
)

ALPHA = 0.5
LOGIT_ATOL = 1e-5


# --------------------------------------------------------------------------- keymap (pure)

def test_rules_map_and_invert():
    pairs = KeyRules(prefix="bert.").pairs()
    assert map_name(pairs, "bert.encoder.layer.0.x") == "encoder.layer.0.x"
    assert map_name(pairs, "classifier.weight") == "classifier.weight"  # names without the prefix are kept
    assert unmap_name(pairs, "encoder.layer.0.x") == "bert.encoder.layer.0.x"
    pairs = KeyRules(rename={"model.visual.": "visual.", "": "x."}).pairs()
    assert pairs[0] == ("model.visual.", "visual.")  # longest stored prefix first
    assert map_name(pairs, "model.visual.conv1.weight") == "visual.conv1.weight"
    assert map_name(pairs, "logit_scale") == "x.logit_scale"
    assert unmap_name(pairs, "visual.conv1.weight") == "model.visual.conv1.weight"
    with pytest.raises(ValueError, match="both map to"):
        canonical_names(KeyRules(prefix="bert.").pairs(), ["bert.a", "a"])


def test_detect_prefix():
    base = ["embeddings.w", "encoder.layer.0.w", "pooler.dense.w"]
    assert detect_prefix(base, ["bert." + n for n in base] + ["classifier.weight"]) == ("bert.", "")
    assert detect_prefix(["model." + n for n in base], base) == ("", "model.")
    assert detect_prefix(base, base + ["classifier.weight"]) is None  # names already match
    # not pure: stripping "m." lands on a name the base lacks, so nothing is guessed
    assert detect_prefix(base, ["m.embeddings.w", "m.encoder.layer.0.w", "m.other"]) is None
    assert detect_prefix(base, ["a.b", "c.d"]) is None


def test_head_suggestion():
    order = ["vit.embeddings.w", "vit.encoder.layer.0.w", "vit.layernorm.w", "classifier.weight", "classifier.bias"]
    assert looks_like_head("classifier.weight", order)
    assert looks_like_head("lm_head.weight", ["model.layers.0.w", "lm_head.weight"])
    assert looks_like_head("head.proj", ["blocks.0.w", "head.proj"])
    assert not looks_like_head("vit.encoder.layer.0.w", order)
    assert suggest_task_specific({"classifier.weight": order, "classifier.bias": order}) == ["classifier.*"]
    assert suggest_task_specific({"classifier.weight": order, "vit.encoder.layer.0.w": order}) is None


# --------------------------------------------------------------------------- helpers

def _perturbed(model: torch.nn.Module, seed: int, skip: tuple[str, ...] = ()) -> None:
    """A 'fine-tune': every float parameter moved by a small heavy-tailed τ (heads are the task's own)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(skip):
                tau = torch.randn(p.shape, generator=g) / torch.rand(p.shape, generator=g).clamp_min(0.05)
                p.add_(1e-3 * tau)


def _write_manifest(folder: Path, base: str, tasks: list[dict], **fields) -> Path:
    path = folder / "zoo.yaml"
    path.write_text(yaml.safe_dump({"name": folder.name, "base": base, "tasks": tasks, **fields}, sort_keys=False))
    return path


def _build(zoo: Path, out: Path, **kw):
    return run_build(BuildConfig(zoo=str(zoo), out=str(out), alphas=[ALPHA], executor="local", show_progress=False, **kw))


def _float_states(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if v.is_floating_point()}


def _hf_folder(src: Path, safetensors_file: Path, dest: Path) -> Path:
    """A folder from_pretrained opens: the task's config.json and the reconstruction as model.safetensors."""
    dest.mkdir(parents=True)
    shutil.copy(src / "config.json", dest / "config.json")
    shutil.copy(safetensors_file, dest / "model.safetensors")
    return dest


def _strict_hf(cls, folder: Path):
    """``cls.from_pretrained(folder)`` with nothing missing, unexpected or of another shape (strict loading;
    transformers 5 renames saved keys on load, so ``load_state_dict`` of saved names is not the test)."""
    model, info = cls.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def _ref_hf(cls, src: Path, sd: dict[str, torch.Tensor], dest: Path):
    """The switch approximation computed by the reference, loaded the same way."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True)
    shutil.copy(src / "config.json", dest / "config.json")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return _strict_hf(cls, dest)


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


# --------------------------------------------------------------------------- ViT heads with their own num_labels

def _vit_cfg(num_labels: int):
    from transformers import ViTConfig

    return ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                     patch_size=8, num_labels=num_labels)


@pytest.fixture(scope="module")
def vit_zoo(tmp_path_factory):
    from transformers import ViTForImageClassification

    root = tmp_path_factory.mktemp("vit_zoo")
    torch.manual_seed(0)
    base = ViTForImageClassification(_vit_cfg(7)).eval()
    base.save_pretrained(str(root / "base"))
    labels = {"beans": 3, "food": 10}
    for i, (task, n) in enumerate(labels.items()):
        torch.manual_seed(10 + i)
        m = ViTForImageClassification(_vit_cfg(n)).eval()
        m.vit.load_state_dict(base.vit.state_dict())
        _perturbed(m, seed=20 + i)
        m.save_pretrained(str(root / task))
    return root, labels


def test_vit_head_mismatch_suggests_task_specific(vit_zoo, tmp_path):
    root, labels = vit_zoo
    zoo = _write_manifest(root, "base", [{"name": t, "uri": t} for t in labels])
    r = cli("build", "--zoo", zoo, "--out", tmp_path / "sw", "--alpha", ALPHA, "--executor", "local", "--quiet")
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "tensor 'classifier.weight' shape mismatch" in text or "tensor 'classifier.bias' shape mismatch" in text
    assert 'add `task_specific: ["classifier.*"]` to the zoo manifest' in text
    assert not (tmp_path / "sw" / "manifest.json").exists()


def test_vit_task_specific_heads_reconstruct_into_their_own_class(vit_zoo, tmp_path):
    from transformers import ViTForImageClassification

    root, labels = vit_zoo
    zoo = _write_manifest(root, "base", [{"name": t, "uri": t} for t in labels], task_specific=["classifier.*"])
    s = _build(zoo, tmp_path / "sw")
    assert s.task_tensor_bytes > 0
    reader = ArtifactReader(str(tmp_path / "sw"))
    assert not any(n.startswith("classifier.") for n in reader.tensors)  # never switched
    assert [e["task"] for e in reader.manifest["task_tensors"]] == list(labels)
    assert reader.manifest["task_specific"] == ["classifier.*"]
    base_sd = load_file(str(root / "base" / "model.safetensors"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for task, n in labels.items():
        task_sd = load_file(str(root / task / "model.safetensors"))
        out = tmp_path / f"{task}.safetensors"
        reconstruct_task(str(tmp_path / "sw"), task, ALPHA, str(out))
        got = load_file(str(out))
        assert set(got) == set(task_sd)
        for name in ("classifier.weight", "classifier.bias"):  # the task's own, bit for bit
            assert got[name].shape[0] == n and torch.equal(got[name], task_sd[name])
        model = _strict_hf(ViTForImageClassification, _hf_folder(root / task, out, tmp_path / task))
        assert model.config.num_labels == n
        ref, _ = reference({"base": _float_states({k: v for k, v in base_sd.items() if not k.startswith("classifier.")}),
                            task: _float_states(task_sd)}, task, ALPHA, "tensor", "rms")
        want = _ref_hf(ViTForImageClassification, root / task, {**ref, "classifier.weight": task_sd["classifier.weight"],
                       "classifier.bias": task_sd["classifier.bias"]}, tmp_path / f"ref-{task}")
        with torch.no_grad():
            torch.testing.assert_close(model(pixel_values=x).logits, want(pixel_values=x).logits,
                                       rtol=0, atol=LOGIT_ATOL)
            assert not torch.equal(model(pixel_values=x).logits, _strict_hf(ViTForImageClassification, root / task)(
                pixel_values=x).logits)  # an approximation of the task, not the task itself


def test_vit_task_tensors_part_is_checked(vit_zoo, tmp_path):
    root, labels = vit_zoo
    zoo = _write_manifest(root, "base", [{"name": t, "uri": t} for t in labels], task_specific=["classifier.*"])
    _build(zoo, tmp_path / "sw")
    entry = ArtifactReader(str(tmp_path / "sw")).manifest["task_tensors"][0]
    part = tmp_path / "sw" / entry["path"]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="task tensors part .* fails its sha256"):
        reconstruct_task(str(tmp_path / "sw"), entry["task"], ALPHA, str(tmp_path / "x.safetensors"))


def test_merge_ignores_task_specific_tensors(vit_zoo, tmp_path):
    from tswitch_ray.distributed.merge import MergeConfig, run_merge

    root, labels = vit_zoo
    tasks = [{"name": t, "uri": t} for t in labels]
    outs = {}
    for how, fields in {"task_specific": {"task_specific": ["classifier.*"]},
                        "exclude": {"exclude": ["classifier.*"]}}.items():
        folder = tmp_path / how
        folder.mkdir()
        zoo = _write_manifest(folder, str(root / "base"), [{**t, "uri": str(root / t["uri"])} for t in tasks], **fields)
        run_merge(MergeConfig(zoo=str(zoo), method="ta", out=str(tmp_path / f"m-{how}"), executor="local",
                              show_progress=False))
        outs[how] = load_file(str(tmp_path / f"m-{how}" / "merged.safetensors"))
    assert not any(k.startswith("classifier.") for k in outs["task_specific"])
    assert set(outs["task_specific"]) == set(outs["exclude"])
    for k, v in outs["exclude"].items():
        assert torch.equal(outs["task_specific"][k], v), k


# --------------------------------------------------------------------------- BertModel base, BertFor... tasks

def _bert_cfg(num_labels: int = 2):
    from transformers import BertConfig

    return BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=32, num_labels=num_labels)


@pytest.fixture(scope="module")
def bert_zoo(tmp_path_factory):
    from transformers import BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("bert_zoo")
    torch.manual_seed(1)
    base = BertModel(_bert_cfg()).eval()
    base.save_pretrained(str(root / "base"))
    labels = {"sst2": 2, "mnli": 3}
    for i, (task, n) in enumerate(labels.items()):
        torch.manual_seed(30 + i)
        m = BertForSequenceClassification(_bert_cfg(n)).eval()
        m.bert.load_state_dict(base.state_dict())
        _perturbed(m, seed=40 + i, skip=("classifier.",))
        m.save_pretrained(str(root / task))
    return root, labels


@pytest.mark.parametrize("explicit", [False, True])
def test_bert_prefix_mapped_and_heads_restored(bert_zoo, tmp_path, caplog, explicit):
    from transformers import BertForSequenceClassification

    root, labels = bert_zoo
    tasks = [{"name": t, "uri": str(root / t), **({"prefix": "bert."} if explicit else {})} for t in labels]
    zoo = _write_manifest(tmp_path, str(root / "base"), tasks, task_specific=["classifier.*"])
    with caplog.at_level(logging.WARNING, logger="tswitch_ray.zoo.zoo"):
        s = _build(zoo, tmp_path / "sw")
    detected = [r.getMessage() for r in caplog.records if "detected" in r.getMessage()]
    if explicit:
        assert not detected
    else:  # printed, never silent: one line per task
        assert len(detected) == len(labels) and all("strips the prefix 'bert.'" in m for m in detected)
    assert s.key_maps == {t: {"rules": [["bert.", ""]], "detected": not explicit} for t in labels}
    layouts = ArtifactReader(str(tmp_path / "sw")).manifest["layouts"]
    assert {t: lay["rules"] for t, lay in layouts.items()} == {t: [["bert.", ""]] for t in labels}
    base_sd = load_file(str(root / "base" / "model.safetensors"))
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(5))
    for task, n in labels.items():
        task_sd = load_file(str(root / task / "model.safetensors"))
        out = tmp_path / f"{task}.safetensors"
        reconstruct_task(str(tmp_path / "sw"), task, ALPHA, str(out))
        got = load_file(str(out))
        assert set(got) == set(task_sd)  # the task's own names: bert.* and classifier.*
        assert torch.equal(got["classifier.weight"], task_sd["classifier.weight"])
        assert torch.equal(got["classifier.bias"], task_sd["classifier.bias"])
        model = _strict_hf(BertForSequenceClassification, _hf_folder(root / task, out, tmp_path / task))
        assert model.config.num_labels == n
        canon = {k.removeprefix("bert."): v for k, v in task_sd.items() if k.startswith("bert.")}
        ref, _ = reference({"base": _float_states(base_sd), task: _float_states(canon)}, task, ALPHA, "tensor", "rms")
        want = _ref_hf(BertForSequenceClassification, root / task, {
            **{"bert." + k: v for k, v in ref.items()}, "classifier.weight": task_sd["classifier.weight"],
            "classifier.bias": task_sd["classifier.bias"]}, tmp_path / f"ref-{task}")
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, want(input_ids=ids).logits,
                                       rtol=0, atol=LOGIT_ATOL)


# --------------------------------------------------------------------------- open_clip-like pickles, buffers

class _Visual(torch.nn.Module):
    """An open_clip-like vision tower with the non-float buffers real models carry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 4, stride=4, bias=False)
        self.ln_pre = torch.nn.LayerNorm(8)
        self.bn = torch.nn.BatchNorm1d(8)  # running stats (float) and num_batches_tracked (int64)
        self.proj = torch.nn.Parameter(torch.randn(8, 4) * 0.1)
        self.register_buffer("position_ids", torch.arange(16).unsqueeze(0))
        self.register_buffer("attn_mask", torch.ones(4, 4, dtype=torch.bool).tril())


class _Clip(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = _Visual()
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))


class _ImageEncoder(torch.nn.Module):
    """task_vectors' ImageEncoder: the open_clip model under ``model``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Clip()


@pytest.fixture(scope="module")
def clip_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_zoo")
    torch.manual_seed(2)
    base = _Clip()
    torch.save(base.state_dict(), root / "base.pt")  # open_clip layout: visual.*
    for i, task in enumerate(("cars", "dtd")):
        enc = _ImageEncoder()
        enc.model.load_state_dict(base.state_dict())
        _perturbed(enc, seed=50 + i)
        enc.train()
        for _ in range(i + 1):  # BatchNorm counts its batches: a task-specific int64 buffer
            enc.model.visual.bn(torch.randn(5, 8))
        if task == "dtd":
            enc.model.visual.attn_mask[0, 1] = True  # a bool mask this task changed
        torch.save(enc.state_dict(), root / f"{task}.pt")  # ImageEncoder layout: model.visual.*
    return root


@pytest.mark.parametrize("explicit", [False, True])
def test_open_clip_model_prefix_and_buffers(clip_zoo, tmp_path, explicit):
    tasks = [{"name": t, "uri": str(clip_zoo / f"{t}.pt"), **({"rename": {"model.": ""}} if explicit else {})}
             for t in ("cars", "dtd")]
    zoo = _write_manifest(tmp_path, str(clip_zoo / "base.pt"), tasks)
    s = _build(zoo, tmp_path / "sw")
    assert s.key_maps == {t: {"rules": [["model.", ""]], "detected": not explicit} for t in ("cars", "dtd")}
    m = ArtifactReader(str(tmp_path / "sw")).manifest
    assert not any("num_batches_tracked" in n or "position_ids" in n or "attn_mask" in n for n in m["tensors"])
    stored = {e["task"]: sorted(e["tensors"]) for e in m["task_tensors"]}
    # only what differs from the base is stored; position_ids are the base's
    assert stored == {"cars": ["visual.bn.num_batches_tracked"],
                      "dtd": ["visual.attn_mask", "visual.bn.num_batches_tracked"]}
    base_sd = torch.load(clip_zoo / "base.pt", weights_only=True)
    for task in ("cars", "dtd"):
        task_sd = torch.load(clip_zoo / f"{task}.pt", weights_only=True)
        out = tmp_path / f"{task}.safetensors"
        reconstruct_task(str(tmp_path / "sw"), task, ALPHA, str(out))
        got = load_file(str(out))
        assert set(got) == set(task_sd)
        for name, t in task_sd.items():
            if not t.is_floating_point():  # buffers bit-exact, whether stored or the base's
                assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
        _ImageEncoder().load_state_dict(got, strict=True)
        canon = {k.removeprefix("model."): v for k, v in task_sd.items()}
        ref, _ = reference({"base": base_sd, task: canon}, task, ALPHA, "tensor", "rms")
        for k, v in ref.items():
            if v.is_floating_point():
                torch.testing.assert_close(got["model." + k], v, rtol=1e-6, atol=0)


def test_buffer_mismatch_never_blocks(clip_zoo, tmp_path):
    """A task whose int buffer has another shape and dtype than the base's still builds, and gets its own back."""
    sd = torch.load(clip_zoo / "cars.pt", weights_only=True)
    sd["model.visual.position_ids"] = torch.arange(20, dtype=torch.int32).unsqueeze(0)
    torch.save(sd, tmp_path / "odd.pt")
    zoo = _write_manifest(tmp_path, str(clip_zoo / "base.pt"), [{"name": "odd", "uri": str(tmp_path / "odd.pt")}])
    load_zoo(str(zoo)).validate()
    _build(zoo, tmp_path / "sw")
    reconstruct_task(str(tmp_path / "sw"), "odd", ALPHA, str(tmp_path / "odd.safetensors"))
    got = load_file(str(tmp_path / "odd.safetensors"))
    assert torch.equal(got["model.visual.position_ids"], sd["model.visual.position_ids"])


def test_float_mismatch_outside_heads_gives_no_suggestion(clip_zoo, tmp_path):
    sd = torch.load(clip_zoo / "cars.pt", weights_only=True)
    sd["model.visual.ln_pre.weight"] = torch.ones(9)
    torch.save(sd, tmp_path / "bad.pt")
    zoo = _write_manifest(tmp_path, str(clip_zoo / "base.pt"), [{"name": "bad", "uri": str(tmp_path / "bad.pt")}])
    with pytest.raises(ZooError) as e:
        load_zoo(str(zoo)).validate()
    assert "visual.ln_pre.weight' shape mismatch" in str(e.value)
    assert "task_specific" not in str(e.value)


def test_cli_build_prints_detected_key_maps_and_task_specific_storage(bert_zoo, tmp_path):
    root, labels = bert_zoo
    zoo = _write_manifest(tmp_path, str(root / "base"), [{"name": t, "uri": str(root / t)} for t in labels],
                          task_specific=["classifier.*"])
    r = cli("build", "--zoo", zoo, "--out", tmp_path / "sw", "--alpha", ALPHA, "--executor", "local", "--quiet")
    assert r.exit_code == 0, r.output
    for task in labels:
        assert f"keys of {task}" in r.output
    assert r.output.count("(detected)") == len(labels) and "'bert.' -> ''" in r.output
    assert "task-specific" in r.output


@pytest.mark.slow
def test_ray_build_of_mapped_zoo_equals_local(bert_zoo, tmp_path, ray_local):
    """Workers detect the same prefix as the driver and stage the same task parts, byte for byte."""
    root, labels = bert_zoo
    zoo = _write_manifest(tmp_path, str(root / "base"), [{"name": t, "uri": str(root / t)} for t in labels],
                          task_specific=["classifier.*"])
    manifests = {}
    for executor in ("local", "ray"):
        run_build(BuildConfig(zoo=str(zoo), out=str(tmp_path / executor), alphas=[ALPHA], executor=executor,
                              show_progress=False))
        manifests[executor] = ArtifactReader(str(tmp_path / executor)).manifest
    for key in ("run_key", "tensors", "task_tensors", "layouts", "parts"):
        assert manifests["local"][key] == manifests["ray"][key], key


@pytest.mark.slow
def test_eval_of_task_specific_zoo_scores_each_reconstruction_with_its_own_head(vit_zoo, tmp_path):
    """T-Switch's accuracy in an evaluation equals that of the reconstruction loaded with from_pretrained into
    the task's own class (its own head, its own num_labels), on the same pixels."""
    import numpy as np
    from transformers import ViTForImageClassification

    from tswitch_ray.distributed.eval_runner import run_eval
    from tswitch_ray.eval.adapters.spec import adapter_from_spec
    from tswitch_ray.eval.config import EvalConfig, MethodSpec
    from tswitch_ray.eval.datasets import open_eval_dataset, write_image_parquet
    from tswitch_ray.tracking import TrackingConfig

    root, labels = vit_zoo
    zoo = _write_manifest(tmp_path, str(root / "base"), [{"name": t, "uri": str(root / t)} for t in labels],
                          task_specific=["classifier.*"])
    _build(zoo, tmp_path / "sw")
    rng = np.random.default_rng(0)
    data = {}
    for task, n in labels.items():
        uri = str(tmp_path / f"{task}.parquet")
        write_image_parquet(uri, [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(12)],
                            np.arange(12) % n)
        data[task] = {"eval": uri}
    adapter = {"kind": "hf_vit_classifier", "base": str(root / "base"), "tasks": {t: str(root / t) for t in labels}}
    cfg = EvalConfig(name="heads", zoo=str(zoo), artifacts=str(tmp_path / "sw"), work_dir=str(tmp_path / "w"),
                     adapter=adapter, data=data, methods=[MethodSpec(method="tswitch", alpha=ALPHA)],
                     tracking=TrackingConfig(enabled=False), executor="local", batch_size=16)
    result = run_eval(cfg, show_progress=False)
    got = {r["task"]: r["accuracy"] for r in result.rows}
    m = ArtifactReader(str(tmp_path / "sw")).manifest
    model_bytes = sum(i.nbytes for i in load_zoo(str(zoo)).base.infos().values())
    # T-Switch's storage counts each task's own head next to the switches
    assert result.summary[0]["storage_bytes"] == (model_bytes + m["totals"]["encoded_bytes"]
                                                  + m["totals"]["task_tensors_bytes"])
    spec_adapter = adapter_from_spec(adapter, str(tmp_path))
    for task in labels:
        out = tmp_path / f"{task}.safetensors"
        reconstruct_task(str(tmp_path / "sw"), task, ALPHA, str(out))
        model = _strict_hf(ViTForImageClassification, _hf_folder(root / task, out, tmp_path / task))
        ds = open_eval_dataset(data[task]["eval"])
        correct = total = 0
        for batch in ds.batches(64, num_classes=labels[task]):
            with torch.no_grad():
                pred = model(pixel_values=spec_adapter.collate(batch.items)).logits.argmax(-1)
            correct += int((pred == torch.as_tensor(batch.labels)).sum())
            total += len(batch.items)
        assert got[task] == pytest.approx(correct / total, abs=1e-12), task


def test_heads_only_in_tasks_without_task_specific_are_named(bert_zoo, caplog):
    """A BertModel base has no classifier: without `task_specific` the build works, and says what it leaves out."""
    root, labels = bert_zoo
    zoo = load_zoo_from(root, labels)
    with caplog.at_level(logging.WARNING, logger="tswitch_ray.zoo.zoo"):
        zoo.validate()
    notes = [r.getMessage() for r in caplog.records if "the base lacks" in r.getMessage()]
    assert len(notes) == len(labels)
    assert all('add `task_specific: ["classifier.*"]`' in m and "classifier.weight" in m for m in notes)


def load_zoo_from(root: Path, labels: dict[str, int]):
    from tswitch_ray.zoo import Zoo

    return Zoo.from_uris("bert", str(root / "base"), {t: str(root / t) for t in labels})


@pytest.mark.parametrize("how", ["base_prefix", "detected"])
def test_base_with_a_prefix_the_tasks_lack(clip_zoo, tmp_path, how):
    """The base saved as an ImageEncoder (model.*), the tasks as open_clip state dicts (visual.*)."""
    base = {"model." + k: v for k, v in torch.load(clip_zoo / "base.pt", weights_only=True).items()}
    torch.save(base, tmp_path / "base.pt")
    for task in ("cars", "dtd"):
        sd = torch.load(clip_zoo / f"{task}.pt", weights_only=True)
        torch.save({k.removeprefix("model."): v for k, v in sd.items()}, tmp_path / f"{task}.pt")
    fields = {"base_prefix": "model."} if how == "base_prefix" else {}
    zoo = _write_manifest(tmp_path, "base.pt", [{"name": t, "uri": f"{t}.pt"} for t in ("cars", "dtd")], **fields)
    s = _build(zoo, tmp_path / "sw")
    want_rules = {} if how == "base_prefix" else {t: {"rules": [["", "model."]], "detected": True} for t in ("cars", "dtd")}
    assert s.key_maps == want_rules
    for task in ("cars", "dtd"):
        task_sd = torch.load(tmp_path / f"{task}.pt", weights_only=True)
        reconstruct_task(str(tmp_path / "sw"), task, ALPHA, str(tmp_path / f"{task}.safetensors"))
        got = load_file(str(tmp_path / f"{task}.safetensors"))
        assert set(got) == set(task_sd)  # the task's own names, whichever side had the prefix
        _Clip().load_state_dict(got, strict=True)
        ref, _ = reference({"base": {k.removeprefix("model."): v for k, v in base.items()}, task: task_sd},
                           task, ALPHA, "tensor", "rms")
        for k, v in ref.items():
            if v.is_floating_point():
                torch.testing.assert_close(got[k], v, rtol=1e-6, atol=0)
        for k, v in task_sd.items():
            if not v.is_floating_point():
                assert torch.equal(got[k], v), k


def test_names_of_another_layout_that_no_prefix_explains_get_a_hint(clip_zoo, tmp_path):
    sd = torch.load(clip_zoo / "cars.pt", weights_only=True)
    torch.save({k.replace(".", "/"): v for k, v in sd.items()}, tmp_path / "odd.pt")  # no prefix maps these
    zoo = _write_manifest(tmp_path, str(clip_zoo / "base.pt"), [{"name": "odd", "uri": str(tmp_path / "odd.pt")}])
    with pytest.raises(ZooError) as e:
        load_zoo(str(zoo)).validate()
    text = str(e.value)
    assert "has no tensor" in text and "its names may follow another layout" in text
    assert "give the task `prefix:` or `rename:` rules" in text
