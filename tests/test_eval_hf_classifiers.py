"""Any transformers sequence / image classifier as an eval adapter, from folders written by ``save_pretrained``.

Every model type listed as supported is built here as a tiny real model, saved
by transformers (one task as sharded safetensors with an index, one as a
``pytorch_model.bin`` written by ``torch.save``), read back through the
adapter and compared with the model's own forward pass.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tswitch_ray.errors import ConfigError, ZooError
from tswitch_ray.eval.adapters import (
    adapter_from_spec,
    read_hf_folder_tensors,
    supported_model_types,
)

ATOL = 1e-5
_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def _text_config(model_type: str, num_labels: int):
    import transformers as tf

    if model_type == "distilbert":
        return tf.DistilBertConfig(vocab_size=50, dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=40,
                                   num_labels=num_labels)
    if model_type in ("roberta", "xlm-roberta", "camembert"):
        cls = {"roberta": tf.RobertaConfig, "xlm-roberta": tf.XLMRobertaConfig, "camembert": tf.CamembertConfig}[model_type]
        return cls(vocab_size=50, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                   eos_token_id=2, num_labels=num_labels, **_SMALL)
    cls = {"bert": tf.BertConfig, "deberta": tf.DebertaConfig, "deberta-v2": tf.DebertaV2Config, "electra": tf.ElectraConfig}[model_type]
    extra = {"embedding_size": 16} if model_type == "electra" else {}
    if model_type.startswith("deberta"):
        extra = {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "max_relative_positions": 16}
    return cls(vocab_size=50, max_position_embeddings=40, pad_token_id=0, num_labels=num_labels, **_SMALL, **extra)


def _image_config(model_type: str, num_labels: int):
    import transformers as tf

    if model_type == "vit":
        return tf.ViTConfig(image_size=32, patch_size=8, num_labels=num_labels, **_SMALL)
    if model_type == "convnext":
        return tf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=num_labels)
    return tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2,
                         num_labels=num_labels)


def _save_zoo(tmp_path, make_model, tasks: dict[str, int]) -> dict:
    """base (safetensors), first task sharded with an index, second as pytorch_model.bin; the reference models."""
    torch.manual_seed(0)
    make_model(2).save_pretrained(str(tmp_path / "base"))
    refs = {}
    for i, (t, c) in enumerate(tasks.items()):
        torch.manual_seed(10 + i)
        refs[t] = make_model(c).eval()
        folder = tmp_path / t
        if i == 0:
            refs[t].save_pretrained(str(folder), max_shard_size="4KB")
            assert (folder / "model.safetensors.index.json").exists()
        else:
            refs[t].config.save_pretrained(str(folder))
            torch.save(refs[t].state_dict(), str(folder / "pytorch_model.bin"))
    return refs


SEQUENCE_TYPES = ["bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "roberta", "xlm-roberta"]


def test_every_listed_sequence_type_is_tested():
    assert tuple(SEQUENCE_TYPES) == supported_model_types("text")


@pytest.mark.parametrize("model_type", SEQUENCE_TYPES)
def test_sequence_classifier_matches_transformers(tmp_path, model_type):
    from transformers import AutoModelForSequenceClassification

    tasks = {"sst2": 2, "mnli": 3}
    refs = _save_zoo(tmp_path, lambda c: AutoModelForSequenceClassification.from_config(_text_config(model_type, c)), tasks)
    adapter = adapter_from_spec({"kind": "hf_sequence_classifier", "base": "base", "tasks": {t: t for t in tasks}}, str(tmp_path))
    assert {t: adapter.num_classes(t) for t in tasks} == tasks
    pad = adapter.preprocess.pad_token_id
    assert pad == refs["sst2"].config.pad_token_id
    rng = np.random.default_rng(0)
    x = adapter.collate([rng.integers(3, 50, n).tolist() for n in (5, 1, 9, 3)])
    assert x.shape == (4, 9) and int((x == pad).sum()) == 4 + 8 + 6
    base = adapter.build(read_hf_folder_tensors(str(tmp_path / "base")))
    for t, ref in refs.items():
        model = adapter.load(base, read_hf_folder_tensors(str(tmp_path / t)))  # sharded / pytorch_model.bin
        with torch.no_grad():
            expected = ref(input_ids=x, attention_mask=(x != pad).long()).logits
            torch.testing.assert_close(adapter.logits(model, x, t), expected, rtol=0, atol=ATOL)
            hidden = ref.base_model(input_ids=x, attention_mask=(x != pad).long()).last_hidden_state
            torch.testing.assert_close(adapter.features(model, x), hidden[:, 0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("model_type", ["vit", "convnext", "swin"])
def test_image_classifier_matches_transformers(tmp_path, model_type):
    from transformers import AutoModelForImageClassification, ViTImageProcessor

    tasks = {"beans": 3, "food": 5}
    refs = _save_zoo(tmp_path, lambda c: AutoModelForImageClassification.from_config(_image_config(model_type, c)), tasks)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]).save_pretrained(str(tmp_path / "base"))
    adapter = adapter_from_spec({"kind": "hf_image_classifier", "base": "base", "tasks": {t: t for t in tasks}}, str(tmp_path))
    assert adapter.preprocess.image_size == 32 and adapter.preprocess.mean == (0.4, 0.5, 0.6)
    from PIL import Image

    rng = np.random.default_rng(1)
    x = adapter.collate([Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(3)])
    assert x.shape == (3, 3, 32, 32)
    base = adapter.build(read_hf_folder_tensors(str(tmp_path / "base")))
    for t, ref in refs.items():
        model = adapter.load(base, read_hf_folder_tensors(str(tmp_path / t)))
        with torch.no_grad():
            expected = ref(pixel_values=x).logits
            torch.testing.assert_close(adapter.logits(model, x, t), expected, rtol=0, atol=ATOL)
            # The features are what the task's classifier reads.
            torch.testing.assert_close(ref.classifier(adapter.features(model, x)), expected, rtol=0, atol=ATOL)


def test_unsupported_and_mixed_model_types_are_refused(tmp_path):
    from transformers import (
        BertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
        RobertaForSequenceClassification,
    )

    GPT2ForSequenceClassification(GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=16)).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ConfigError, match=r"gpt2/config\.json: model_type 'gpt2' is not supported by the 'hf_sequence_classifier' "
                                          r"adapter \(AutoModelForSequenceClassification\); supported model types: bert, camembert, deberta"):
        adapter_from_spec({"kind": "hf_sequence_classifier", "base": "gpt2", "tasks": {"x": "gpt2"}}, str(tmp_path))
    BertForSequenceClassification(_text_config("bert", 2)).save_pretrained(str(tmp_path / "bert"))
    RobertaForSequenceClassification(_text_config("roberta", 2)).save_pretrained(str(tmp_path / "rob"))
    with pytest.raises(ConfigError, match=r"rob/config\.json: task 'x' has model_type 'roberta', the base .*bert has 'bert'"):
        adapter_from_spec({"kind": "hf_sequence_classifier", "base": "bert", "tasks": {"x": "rob"}}, str(tmp_path))
    with pytest.raises(ConfigError, match=r"model_type 'bert' is not supported by the 'hf_image_classifier'"):
        adapter_from_spec({"kind": "hf_image_classifier", "base": "bert", "tasks": {"x": "bert"}}, str(tmp_path))


def test_head_of_another_shape_than_its_config_is_a_clear_error(tmp_path):
    from transformers import BertForSequenceClassification

    BertForSequenceClassification(_text_config("bert", 2)).save_pretrained(str(tmp_path / "t"))
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["id2label"] = {str(i): f"L{i}" for i in range(4)}
    cfg["label2id"] = {f"L{i}": i for i in range(4)}
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ZooError, match=r"t: head tensor classifier\.weight has shape \(2, 32\), its config\.json \(num_labels 4\) gives \(4, 32\)"):
        adapter_from_spec({"kind": "hf_sequence_classifier", "base": "t", "tasks": {"x": "t"}}, str(tmp_path))


def test_eval_refuses_an_unsupported_model_type_before_any_merge(tmp_path):
    import yaml
    from transformers import BertForSequenceClassification

    from tswitch_ray.distributed.eval_runner import run_eval
    from tswitch_ray.eval.config import EvalConfig, MethodSpec
    from tswitch_ray.eval.datasets import write_token_parquet
    from tswitch_ray.tracking import TrackingConfig

    for i, name in enumerate(["base", "a", "b"]):
        torch.manual_seed(i)
        BertForSequenceClassification(_text_config("bert", 2)).save_pretrained(str(tmp_path / name))
        write_token_parquet(str(tmp_path / f"{name}.parquet"), [[2, 5, 7]], [1])
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({"name": "z", "base": "base", "tasks": [{"name": t, "uri": t} for t in "ab"]}))
    cfg = EvalConfig(zoo=str(tmp_path / "zoo.yaml"), work_dir=str(tmp_path / "work"), executor="local",
                     adapter={"kind": "hf_image_classifier", "base": "base", "tasks": {"a": "a", "b": "b"}},
                     data={t: {"eval": str(tmp_path / f"{t}.parquet")} for t in "ab"},
                     methods=[MethodSpec(method="ta")], tracking=TrackingConfig(enabled=False))
    with pytest.raises(ConfigError, match=r"eval config 'eval', adapter: .*base/config\.json: model_type 'bert' is not supported "
                                          r"by the 'hf_image_classifier' adapter \(AutoModelForImageClassification\); supported model types: .*vit"):
        run_eval(cfg, show_progress=False)
    assert not (tmp_path / "work").exists()  # nothing merged, nothing written
