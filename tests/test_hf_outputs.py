"""`tswitch reconstruct --format hf` and `tswitch merge --format hf` write folders ``from_pretrained`` loads.

Zoos are tiny real transformers models written by ``save_pretrained`` (ViT and
BERT classifiers in fp32, a Llama with tied embeddings in bf16); the outputs
are loaded back by transformers itself (no missing, unexpected or mismatched
keys) and compared, tensor by tensor and by logits, with the project's
safetensors output of the same reconstruction or merge.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from tswitch_ray.cli import app
from tswitch_ray.distributed.build import BuildConfig, run_build


def _cli(*args) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def _zoo(tmp_path: Path, make, tasks=("t1", "t2"), dtype=torch.float32, exclude=()) -> Path:
    """base + tasks saved by save_pretrained (the tasks: the base plus seeded noise, like fine-tunes)."""
    torch.manual_seed(0)
    base = make().to(dtype)
    base.save_pretrained(str(tmp_path / "base"))
    for i, t in enumerate(tasks):
        torch.manual_seed(1 + i)
        m = make().to(dtype)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
        m.save_pretrained(str(tmp_path / t))
    manifest = {"name": "hf", "base": "base", "tasks": [{"name": t, "uri": t} for t in tasks], "exclude": list(exclude)}
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(manifest))
    return tmp_path / "zoo.yaml"


def _build(zoo: Path, out: Path) -> Path:
    run_build(BuildConfig(zoo=str(zoo), out=str(out), alphas=[0.5], executor="local", show_progress=False))
    return out


def _loaded(cls, folder: Path):
    model, info = cls.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _reference(cls, config, state_dict):
    """The model a state dict in checkpoint layout gives, loaded by transformers itself (strict)."""
    model, info = cls.from_pretrained(None, config=config, state_dict=state_dict, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                               image_size=32, patch_size=8, num_labels=4))


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=2, max_position_embeddings=32, num_labels=3))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True))


def test_reconstruct_vit_as_hf_folder_loads_and_matches(tmp_path):
    from transformers import ViTForImageClassification

    arts = _build(_zoo(tmp_path, _tiny_vit), tmp_path / "sw")
    _cli("reconstruct", "--artifacts", arts, "--task", "t2", "--alpha", "0.5", "--out", tmp_path / "t2.safetensors")
    _cli("reconstruct", "--artifacts", arts, "--task", "t2", "--alpha", "0.5", "--format", "hf", "--out", tmp_path / "t2-hf")
    out = tmp_path / "t2-hf"
    assert _files(out) == {"config.json", "model.safetensors", "reconstruct.json"}  # small: one shard, no index
    assert (out / "config.json").read_bytes() == (tmp_path / "t2" / "config.json").read_bytes()
    flat = load_file(str(tmp_path / "t2.safetensors"))
    model = _loaded(ViTForImageClassification, out)
    ref = _reference(ViTForImageClassification, model.config, flat)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, ref(pixel_values=x).logits, rtol=0, atol=0)
    # Reconstruction is not the task itself (α = 0.5 drops half of τ): the logits differ from the fine-tune's.
    with torch.no_grad():
        assert not torch.allclose(model(pixel_values=x).logits, _loaded(ViTForImageClassification, tmp_path / "t2")(pixel_values=x).logits)
    marker = json.loads((out / "reconstruct.json").read_text())
    assert marker["task"] == "t2" and {o["path"] for o in marker["outputs"]} == {"config.json", "model.safetensors"}


def test_reconstruct_bert_sharded_with_index(tmp_path):
    from transformers import BertForSequenceClassification

    arts = _build(_zoo(tmp_path, _tiny_bert), tmp_path / "sw")
    _cli("reconstruct", "--artifacts", arts, "--task", "t1", "--alpha", "0.5", "--out", tmp_path / "t1.safetensors")
    _cli("reconstruct", "--artifacts", arts, "--task", "t1", "--alpha", "0.5", "--format", "hf", "--max-shard-size", "30KB",
         "--out", tmp_path / "t1-hf")
    out = tmp_path / "t1-hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {f for f in _files(out) if f.endswith(".safetensors")} == set(shards)
    assert not (out / ".staging").exists()
    flat = load_file(str(tmp_path / "t1.safetensors"))
    assert set(index["weight_map"]) == set(flat)
    assert all((out / s).stat().st_size <= 30_000 + 2_000 or len(load_file(str(out / s))) == 1 for s in shards)
    model = _loaded(BertForSequenceClassification, out)
    sd = model.state_dict()
    for name, t in flat.items():
        torch.testing.assert_close(sd[name], t, rtol=0, atol=0)
    ids = torch.randint(1, 60, (2, 7))
    ref = _reference(BertForSequenceClassification, model.config, flat)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    # Another task into the same committed folder is refused; --overwrite replaces it.
    r = CliRunner().invoke(app, ["reconstruct", "--artifacts", str(arts), "--task", "t2", "--alpha", "0.5", "--format", "hf",
                                 "--out", str(out)])
    assert r.exit_code == 2 and "refusing to replace" in r.output
    _cli("reconstruct", "--artifacts", arts, "--task", "t2", "--alpha", "0.5", "--format", "hf", "--overwrite", "--out", out)
    assert json.loads((out / "reconstruct.json").read_text())["task"] == "t2"


def test_reconstruct_bf16_llama_keeps_embeddings_tied(tmp_path):
    from transformers import LlamaForCausalLM

    arts = _build(_zoo(tmp_path, _tiny_llama, dtype=torch.bfloat16), tmp_path / "sw")
    assert "lm_head.weight" not in load_file(str(tmp_path / "base" / "model.safetensors"))  # save_pretrained ties it
    _cli("reconstruct", "--artifacts", arts, "--task", "t1", "--alpha", "0.5", "--out", tmp_path / "t1.safetensors")
    _cli("reconstruct", "--artifacts", arts, "--task", "t1", "--alpha", "0.5", "--format", "hf", "--max-shard-size", "20KB",
         "--out", tmp_path / "t1-hf")
    out = tmp_path / "t1-hf"
    assert "generation_config.json" in _files(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    assert all(t.dtype == torch.bfloat16 for s in set(index["weight_map"].values()) for t in load_file(str(out / s)).values())
    model = _loaded(LlamaForCausalLM, out)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    flat = load_file(str(tmp_path / "t1.safetensors"))
    assert "lm_head.weight" not in flat
    ref = _reference(LlamaForCausalLM, model.config, flat)  # lm_head tied to the embeddings again
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["ta", "emr"])
def test_merge_as_hf_folders(tmp_path, method):
    """A one-model merge (TA) is OUT/merged/ with the base's config; a per-task one (EMR) OUT/<task>/ with each
    task's own config and its own classifier (excluded from the merge: the tasks have other label counts)."""
    from transformers import ViTConfig, ViTForImageClassification

    zoo = _zoo(tmp_path, _tiny_vit, exclude=["classifier.*"])
    # t2 gets its own label count: its head is its own, not the base's.
    torch.manual_seed(5)
    t2 = ViTForImageClassification(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                             image_size=32, patch_size=8, num_labels=7))
    t2.vit.load_state_dict(_loaded(ViTForImageClassification, tmp_path / "t2").vit.state_dict())
    t2.save_pretrained(str(tmp_path / "t2"))
    _cli("merge", "--zoo", zoo, "--method", method, "--executor", "local", "--out", tmp_path / "flat")
    _cli("merge", "--zoo", zoo, "--method", method, "--executor", "local", "--format", "hf", "--max-shard-size", "40KB",
         "--out", tmp_path / "hf")
    models = ["merged"] if method == "ta" else ["t1", "t2"]
    marker = json.loads((tmp_path / "hf" / "merge.json").read_text())
    assert {o["path"].split("/")[0] for o in marker["outputs"]} == set(models)
    x = torch.randn(2, 3, 32, 32)
    for m in models:
        folder = tmp_path / "hf" / m
        assert (folder / "model.safetensors.index.json").exists()
        src = tmp_path / ("base" if m == "merged" else m)
        assert (folder / "config.json").read_bytes() == (src / "config.json").read_bytes()
        model = _loaded(ViTForImageClassification, folder)
        flat = load_file(str(tmp_path / "flat" / f"{m}.safetensors"))  # the merged backbone, without classifier.*
        own = load_file(str(src / "model.safetensors"))
        ref = _reference(ViTForImageClassification, model.config,
                         {**flat, "classifier.weight": own["classifier.weight"], "classifier.bias": own["classifier.bias"]})
        with torch.no_grad():
            torch.testing.assert_close(model(pixel_values=x).logits, ref(pixel_values=x).logits, rtol=0, atol=0)
    if method == "emr":
        assert _loaded(ViTForImageClassification, tmp_path / "hf" / "t2").config.num_labels == 7


def test_hf_output_bad_requests_write_nothing(tmp_path):
    """No config.json to copy (a zoo of bare safetensors files), a bad shard size or format: exit 2, nothing written."""
    from test_build_reconstruct import make_state, write_zoo

    zoo = write_zoo(tmp_path / "zoo", make_state(0), "safetensors")
    arts = _build(zoo, tmp_path / "sw")
    cases = [
        (["reconstruct", "--artifacts", arts, "--task", "cars", "--alpha", "0.5", "--format", "hf", "--out", tmp_path / "o1"],
         "no config.json"),
        (["reconstruct", "--artifacts", arts, "--task", "cars", "--alpha", "0.5", "--format", "hf", "--max-shard-size", "lots",
          "--out", tmp_path / "o2"], "shard size 'lots' is not a size"),
        (["reconstruct", "--artifacts", arts, "--task", "cars", "--alpha", "0.5", "--format", "onnx", "--out", tmp_path / "o3"],
         "--format 'onnx': use safetensors or hf"),
        (["merge", "--zoo", zoo, "--method", "ta", "--executor", "local", "--format", "hf", "--out", tmp_path / "o4"], "no config.json"),
    ]
    for args, needle in cases:
        r = CliRunner().invoke(app, [str(a) for a in args])
        assert r.exit_code == 2 and needle in " ".join(r.output.split()), r.output
        assert "Traceback" not in r.output
        assert not Path(args[-1]).exists()


def test_reconstruct_hf_of_tasks_with_their_own_heads_loads_each_into_its_own_class(tmp_path):
    """Per-task heads (``task_specific``) of another label count than the base's come back bit for bit in the
    HF folder, so each task loads with ``from_pretrained`` into its own class."""
    from transformers import ViTConfig, ViTForImageClassification

    def vit(labels: int) -> ViTForImageClassification:
        return ViTForImageClassification(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=32, patch_size=8, num_labels=labels))

    torch.manual_seed(0)
    base = vit(4)
    base.save_pretrained(str(tmp_path / "base"))
    labels = {"t1": 3, "t2": 10}
    for i, (task, n) in enumerate(labels.items()):
        torch.manual_seed(1 + i)
        m = vit(n)
        m.vit.load_state_dict(base.vit.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
        m.save_pretrained(str(tmp_path / task))
    manifest = {"name": "heads", "base": "base", "tasks": [{"name": t, "uri": t} for t in labels],
                "task_specific": ["classifier.*"]}
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(manifest))
    arts = _build(tmp_path / "zoo.yaml", tmp_path / "sw")
    x = torch.randn(2, 3, 32, 32)
    for task, n in labels.items():
        out = tmp_path / f"{task}-hf"
        _cli("reconstruct", "--artifacts", arts, "--task", task, "--alpha", "0.5", "--format", "hf", "--out", out)
        _cli("reconstruct", "--artifacts", arts, "--task", task, "--alpha", "0.5", "--out", tmp_path / f"{task}.safetensors")
        model = _loaded(ViTForImageClassification, out)
        own = _loaded(ViTForImageClassification, tmp_path / task)
        assert model.config.num_labels == n
        for name in ("classifier.weight", "classifier.bias"):
            assert torch.equal(model.state_dict()[name], own.state_dict()[name])  # lossless, not switched
        ref = _reference(ViTForImageClassification, model.config, load_file(str(tmp_path / f"{task}.safetensors")))
        with torch.no_grad():
            assert model(pixel_values=x).logits.shape == (2, n)
            torch.testing.assert_close(model(pixel_values=x).logits, ref(pixel_values=x).logits, rtol=0, atol=0)
