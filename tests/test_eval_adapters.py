"""Model adapters, built from random-initialised checkpoints saved in their real on-disk formats.

Each test writes a checkpoint the way its ecosystem does (open_clip state dict
as safetensors, HF ``save_pretrained`` folders), builds the adapter through
:func:`adapter_from_spec`, runs it on a batch read from a real Parquet eval
split and compares with the reference library's own forward pass.
"""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from tswitch_ray.errors import ConfigError, ZooError
from tswitch_ray.eval.adapters import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    HFCLIPVisionAdapter,
    HFSequenceClassifierAdapter,
    HFViTClassifierAdapter,
    LinearHead,
    ModelAdapter,
    OpenClipVisionAdapter,
    adapter_from_spec,
    load_head,
    save_head,
)
from tswitch_ray.eval.datasets import EvalDataError, open_eval_dataset, write_image_parquet, write_token_parquet
from tswitch_ray.eval.evaluate import evaluate, extract_features, predict

ATOL = 1e-5
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1},
}


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Varied sizes and aspect ratios, so resize + centre-crop is exercised."""
    rng = np.random.default_rng(seed)
    sizes = [(32, 32), (40, 57), (57, 40), (33, 90), (20, 25)]
    return [rng.integers(0, 256, sizes[i % len(sizes)] + (3,), dtype=np.uint8) for i in range(n)]


def _image_batch(tmp_path, n: int = 5, n_classes: int = 3, seed: int = 0):
    """(dataset, decoded PIL images, labels) of a real Parquet split."""
    uri = str(tmp_path / "eval.parquet")
    labels = np.arange(n) % n_classes
    write_image_parquet(uri, _images(n, seed), labels, row_group_size=4)
    ds = open_eval_dataset(uri)
    items = [im for b in ds.batches(64, num_classes=n_classes) for im in b.items]
    return ds, items, torch.as_tensor(labels)


def _open_clip_pixels(items, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """open_clip's own eval transform, the reference for the adapters' collate."""
    t = open_clip.image_transform(size, is_train=False, mean=mean, std=std)
    return torch.stack([t(im) for im in items])


def _linear_head(n_classes: int, dim: int, seed: int, projection_from: int | None = None) -> LinearHead:
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(dim, projection_from, generator=g) if projection_from else None
    return LinearHead(torch.randn(n_classes, dim, generator=g), torch.randn(n_classes, generator=g), proj, normalize=True, classes=[f"c{i}" for i in range(n_classes)])


def _ref_head(f: torch.Tensor, head: LinearHead) -> torch.Tensor:
    if head.projection is not None:
        f = f @ head.projection.T
    f = f / f.norm(dim=-1, keepdim=True)
    return f @ head.weight.T + head.bias


def _assert_accuracy(adapter, model, ds, task, ref_logits, labels):
    res = evaluate(adapter, model, ds, task, batch_size=2, device="cpu")
    want = int((ref_logits.argmax(-1) == labels).sum())
    assert res["n"] == len(labels) and res["correct"] == want and res["accuracy"] == pytest.approx(want / len(labels))


# ---------------------------------------------------------------- open_clip


def _tiny_clip(seed: int = 0) -> open_clip.model.CLIP:
    torch.manual_seed(seed)
    cfg = dict(TINY_OPEN_CLIP)
    return open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True).eval()


class _ImageEncoder(torch.nn.Module):
    """The task_vectors ``ImageEncoder`` shape: ``self.model`` = open_clip CLIP without its text transformer."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.model = clip
        delattr(self.model, "transformer")

    def forward(self, images):
        return self.model.encode_image(images)


@pytest.mark.parametrize("layout", ["visual.", "model.visual.", ""])
def test_open_clip_adapter_matches_open_clip(tmp_path, layout):
    clip = _tiny_clip()
    if layout == "visual.":  # an open_clip CLIP state dict (text tower keys present and ignored)
        sd = clip.state_dict()
    elif layout == "model.visual.":  # task_vectors ImageEncoder after `tswitch zoo convert`
        sd = _ImageEncoder(_tiny_clip()).state_dict()
        clip = _tiny_clip()
    else:  # bare tower
        sd = clip.visual.state_dict()
    assert any(k.startswith(layout + "conv1.") for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "finetuned.safetensors"))
    heads = {"cars": _linear_head(3, 16, 1), "dtd": _linear_head(5, 16, 2)}
    for t, h in heads.items():
        save_head(str(tmp_path / "heads" / f"{t}.safetensors"), h)

    spec = {"kind": "open_clip", "model": TINY_OPEN_CLIP, "heads": "heads"}
    adapter = adapter_from_spec(json.loads(json.dumps(spec)), str(tmp_path))
    assert isinstance(adapter, OpenClipVisionAdapter) and isinstance(adapter, ModelAdapter)
    assert sorted(adapter.tasks) == ["cars", "dtd"] and adapter.num_classes("dtd") == 5
    assert adapter.preprocess.image_size == 32 and adapter.preprocess.modality == "image"

    model = adapter.build(load_file(str(tmp_path / "finetuned.safetensors")))
    ds, items, labels = _image_batch(tmp_path)
    x = adapter.collate(items)
    ref_x = _open_clip_pixels(items, 32)
    torch.testing.assert_close(x, ref_x, rtol=0, atol=1e-6)

    with torch.no_grad():
        ref_f = clip.encode_image(ref_x)
        f = adapter.features(model, x)
        torch.testing.assert_close(f, ref_f, rtol=0, atol=ATOL)
        for t, h in heads.items():
            torch.testing.assert_close(adapter.logits(model, x, t), _ref_head(ref_f, h), rtol=0, atol=ATOL)
    _assert_accuracy(adapter, model, ds, "cars", _ref_head(ref_f, heads["cars"]), labels)
    torch.testing.assert_close(extract_features(adapter, model, ds, limit=3, batch_size=2, device="cpu"), ref_f[:3], rtol=0, atol=ATOL)
    lg, lb = predict(adapter, model, ds, "dtd", batch_size=2, device="cpu")
    torch.testing.assert_close(lg, _ref_head(ref_f, heads["dtd"]), rtol=0, atol=ATOL)
    assert torch.equal(lb, labels)

    # load() reuses a built model for another state dict (the per-task loop of the eval runner)
    other = _tiny_clip(seed=7)
    adapter.load(model, other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(adapter.features(model, x), other.encode_image(ref_x), rtol=0, atol=ATOL)


def test_open_clip_heads_subset_and_options(tmp_path):
    for t in ("a", "b"):
        save_head(str(tmp_path / "heads" / f"{t}.safetensors"), _linear_head(2, 16, 0))
    a = adapter_from_spec({"kind": "open_clip", "model": TINY_OPEN_CLIP, "heads": "heads", "tasks": ["b"], "mean": [0.5] * 3, "std": [0.25] * 3}, str(tmp_path))
    assert a.tasks == ["b"] and a.preprocess.mean == (0.5, 0.5, 0.5) and a.preprocess.std == (0.25, 0.25, 0.25)
    with pytest.raises(ConfigError, match=r"no classification head for task 'a'.*b"):
        a.num_classes("a")
    h = load_head(str(tmp_path / "heads" / "a.safetensors"))
    assert h.classes == ["c0", "c1"] and h.normalize


def test_open_clip_real_vit_b32_layout(tmp_path):
    """The real ViT-B/32 keys and shapes (task_vectors' ``model.visual.*`` after conversion) are accepted."""
    with torch.device("meta"):
        ref = open_clip.model.CLIP(**open_clip.get_model_config("ViT-B-32"))
    shapes = {"model." + k: v.shape for k, v in ref.state_dict().items() if not k.startswith("transformer.")}
    # spot-check against the layout of the task_vectors checkpoints (open_clip 2.0.2 ViT-B-32)
    assert shapes["model.visual.conv1.weight"] == (768, 3, 32, 32)
    assert shapes["model.visual.positional_embedding"] == (50, 768)
    assert shapes["model.visual.transformer.resblocks.11.attn.in_proj_weight"] == (2304, 768)
    assert shapes["model.visual.proj"] == (768, 512)
    sd = {k: torch.zeros(()).expand(s) for k, s in shapes.items()}  # no memory for the bulk
    g = torch.Generator().manual_seed(0)
    for k in ("model.visual.conv1.weight", "model.visual.proj", "model.visual.transformer.resblocks.11.mlp.c_fc.weight"):
        sd[k] = torch.randn(shapes[k], generator=g) * 0.02
    sd["model.visual.ln_post.weight"] = torch.ones(768)
    save_head(str(tmp_path / "heads" / "svhn.safetensors"), _linear_head(10, 512, 3))

    adapter = adapter_from_spec({"kind": "open_clip", "model": "ViT-B-32", "heads": "heads"}, str(tmp_path))
    assert adapter.preprocess.image_size == 224
    model = adapter.build(sd)
    own = model.state_dict()
    for k in ("conv1.weight", "proj", "transformer.resblocks.11.mlp.c_fc.weight"):
        assert torch.equal(own[k], sd["model.visual." + k])
    assert torch.count_nonzero(own["transformer.resblocks.3.attn.in_proj_weight"]) == 0  # copied, not the random init
    assert adapter.num_classes("svhn") == 10 and adapter.head("svhn").in_features == model.output_dim == 512
    assert not adapter.model_cfg.get("quick_gelu")
    qg = adapter_from_spec({"kind": "open_clip", "model": "ViT-B-32-quickgelu", "heads": "heads"}, str(tmp_path))
    assert qg.model_cfg.get("quick_gelu") is True


def test_open_clip_mismatch_is_a_clear_error(tmp_path):
    save_head(str(tmp_path / "heads" / "t.safetensors"), _linear_head(2, 16, 0))
    a = adapter_from_spec({"kind": "open_clip", "model": TINY_OPEN_CLIP, "heads": "heads"}, str(tmp_path))
    sd = _tiny_clip().state_dict()
    missing = {k: v for k, v in sd.items() if k != "visual.proj"}
    with pytest.raises(ZooError, match=r"prefix 'visual\.'\): 1 missing, e\.g\. \['visual\.proj'\]\. Check"):
        a.build(missing)
    bad = dict(sd, **{"visual.proj": torch.zeros(32, 8)})
    with pytest.raises(ZooError, match=r"visual\.proj has shape \(32, 8\).*\(32, 16\)"):
        a.build(bad)
    with pytest.raises(ConfigError, match="no model config named 'ViT-Nope'"):
        adapter_from_spec({"kind": "open_clip", "model": "ViT-Nope", "heads": "heads"}, str(tmp_path))
    with pytest.raises(ZooError, match="heads folder not found"):
        adapter_from_spec({"kind": "open_clip", "model": TINY_OPEN_CLIP, "heads": "nowhere"}, str(tmp_path))
    with pytest.raises(ConfigError, match="unknown"):
        adapter_from_spec({"kind": "timm"})


def test_label_outside_head_is_a_clear_error_in_evaluate(tmp_path):
    save_head(str(tmp_path / "heads" / "t.safetensors"), _linear_head(2, 16, 0))
    a = adapter_from_spec({"kind": "open_clip", "model": TINY_OPEN_CLIP, "heads": "heads"}, str(tmp_path))
    model = a.build(_tiny_clip().state_dict())
    uri = str(tmp_path / "e.parquet")
    write_image_parquet(uri, _images(4), [0, 1, 2, 1])
    with pytest.raises(EvalDataError, match=r"row 2 has label 2.*2 classes"):
        evaluate(a, model, open_eval_dataset(uri), "t", device="cpu")


# ---------------------------------------------------------------- Hugging Face CLIPVisionModel


def _tiny_clip_vision_cfg():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)


@pytest.mark.parametrize("full_clip", [False, True], ids=["CLIPVisionModel", "CLIPModel"])
def test_hf_clip_vision_adapter_matches_transformers(tmp_path, full_clip):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionModel

    torch.manual_seed(0)
    vcfg = _tiny_clip_vision_cfg()
    if full_clip:  # a whole CLIPModel folder: the adapter takes vision_model.* and the vision config
        tcfg = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50, max_position_embeddings=8)
        ref = CLIPModel(CLIPConfig(text_config=tcfg.to_dict(), vision_config=vcfg.to_dict(), projection_dim=16)).eval()
        vision = ref.vision_model
        proj = ref.visual_projection.weight.detach()
    else:
        ref = CLIPVisionModel(vcfg).eval()
        vision = getattr(ref, "vision_model", ref)  # transformers 5: the model is the vision transformer
        proj = torch.randn(16, 32)
    ref.save_pretrained(str(tmp_path / "base_hf"))
    assert (tmp_path / "base_hf" / "model.safetensors").exists()
    heads = {"eurosat": _linear_head(4, 16, 5, projection_from=32)}
    heads["eurosat"].projection.data.copy_(proj)  # FusionBench: the base model's visual_projection
    save_head(str(tmp_path / "heads" / "eurosat.safetensors"), heads["eurosat"])

    adapter = adapter_from_spec({"kind": "hf_clip_vision", "folder": "base_hf", "heads": "heads"}, str(tmp_path))
    assert isinstance(adapter, HFCLIPVisionAdapter) and adapter.preprocess.image_size == 32
    sd = load_file(str(tmp_path / "base_hf" / "model.safetensors"))
    model = adapter.build(sd)

    ds, items, labels = _image_batch(tmp_path, n_classes=4)
    x = adapter.collate(items)
    torch.testing.assert_close(x, _open_clip_pixels(items, 32), rtol=0, atol=1e-6)
    with torch.no_grad():
        ref_f = vision(pixel_values=x).pooler_output
        torch.testing.assert_close(adapter.features(model, x), ref_f, rtol=0, atol=ATOL)
        ref_logits = _ref_head(ref_f, heads["eurosat"])
        torch.testing.assert_close(adapter.logits(model, x, "eurosat"), ref_logits, rtol=0, atol=ATOL)
        if full_clip:  # same as CLIP's own normalised image embeddings times the head
            emb = ref.visual_projection(ref_f)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            torch.testing.assert_close(adapter.logits(model, x, "eurosat"), emb @ heads["eurosat"].weight.T + heads["eurosat"].bias, rtol=0, atol=ATOL)
    _assert_accuracy(adapter, model, ds, "eurosat", ref_logits, labels)


# ---------------------------------------------------------------- Hugging Face ViTForImageClassification


def _tiny_vit_cfg(num_labels: int):
    from transformers import ViTConfig

    return ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, num_labels=num_labels)


@pytest.mark.parametrize("base_kind", ["ViTForImageClassification", "ViTModel"])
def test_hf_vit_classifier_adapter_matches_transformers(tmp_path, base_kind):
    from transformers import ViTForImageClassification, ViTModel

    torch.manual_seed(0)
    if base_kind == "ViTModel":  # e.g. an in21k backbone: bare keys plus a pooler
        ViTModel(_tiny_vit_cfg(2)).save_pretrained(str(tmp_path / "base"))
    else:
        ViTForImageClassification(_tiny_vit_cfg(7)).save_pretrained(str(tmp_path / "base"))
    tasks = {"beans": 3, "food": 5}
    refs = {}
    for i, (t, c) in enumerate(tasks.items()):
        torch.manual_seed(10 + i)
        refs[t] = ViTForImageClassification(_tiny_vit_cfg(c)).eval()
        refs[t].save_pretrained(str(tmp_path / t))

    spec = {"kind": "hf_vit_classifier", "base": "base", "tasks": {t: t for t in tasks}}
    adapter = adapter_from_spec(spec, str(tmp_path))
    assert isinstance(adapter, HFViTClassifierAdapter)
    assert {t: adapter.num_classes(t) for t in tasks} == tasks
    base_model = adapter.build(load_file(str(tmp_path / "base" / "model.safetensors")))

    ds, items, labels = _image_batch(tmp_path, n_classes=3)
    x = adapter.collate(items)
    torch.testing.assert_close(x, _open_clip_pixels(items, 32, (0.5,) * 3, (0.5,) * 3), rtol=0, atol=1e-6)
    for t, ref in refs.items():
        model = adapter.load(base_model, load_file(str(tmp_path / t / "model.safetensors")))  # the task's own backbone
        with torch.no_grad():
            out = ref(pixel_values=x, output_hidden_states=False)
            torch.testing.assert_close(adapter.logits(model, x, t), out.logits, rtol=0, atol=ATOL)
            torch.testing.assert_close(adapter.features(model, x), ref.vit(pixel_values=x).last_hidden_state[:, 0], rtol=0, atol=ATOL)
    with torch.no_grad():
        ref_logits = refs["beans"](pixel_values=x).logits
    _assert_accuracy(adapter, adapter.load(base_model, refs["beans"].state_dict()), ds, "beans", ref_logits, labels)


def test_hf_vit_task_folder_without_classifier(tmp_path):
    from transformers import ViTModel

    ViTModel(_tiny_vit_cfg(2)).save_pretrained(str(tmp_path / "base"))
    with pytest.raises(ZooError, match=r"base: checkpoint has no vit\.\* tensors \(a bare base model\)"):
        adapter_from_spec({"kind": "hf_vit_classifier", "base": "base", "tasks": {"x": "base"}}, str(tmp_path))
    with pytest.raises(ConfigError, match="needs 'tasks'"):
        adapter_from_spec({"kind": "hf_vit_classifier", "base": "base"}, str(tmp_path))


# ---------------------------------------------------------------- Hugging Face RoBERTa sequence classifiers


def _tiny_roberta_cfg(num_labels: int):
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=num_labels)


def test_hf_sequence_classifier_adapter_matches_transformers(tmp_path):
    from transformers import RobertaForMaskedLM, RobertaForSequenceClassification

    torch.manual_seed(0)
    RobertaForMaskedLM(_tiny_roberta_cfg(2)).save_pretrained(str(tmp_path / "roberta-base"))  # roberta.* + lm_head.*
    tasks = {"sst2": 2, "mnli": 3}
    refs = {}
    for i, (t, c) in enumerate(tasks.items()):
        torch.manual_seed(20 + i)
        refs[t] = RobertaForSequenceClassification(_tiny_roberta_cfg(c)).eval()
        refs[t].save_pretrained(str(tmp_path / "ft" / t))

    adapter = adapter_from_spec({"kind": "hf_sequence_classifier", "base": "roberta-base", "tasks": {t: f"ft/{t}" for t in tasks}}, str(tmp_path))
    assert isinstance(adapter, HFSequenceClassifierAdapter)
    assert adapter.preprocess.modality == "text" and adapter.preprocess.pad_token_id == 1
    assert {t: adapter.num_classes(t) for t in tasks} == tasks

    rng = np.random.default_rng(0)
    rows = [[0, *rng.integers(3, 50, n).tolist(), 2] for n in (5, 1, 9, 3)]
    labels = [1, 0, 1, 1]
    uri = str(tmp_path / "sst2.parquet")
    write_token_parquet(uri, rows, labels)
    ds = open_eval_dataset(uri)
    items = [r for b in ds.batches(8, num_classes=2) for r in b.items]
    x = adapter.collate(items)
    assert x.shape == (4, 11) and x.dtype == torch.long
    assert x[1].tolist() == rows[1] + [1] * 8  # right-padded with <pad>

    base = adapter.build(load_file(str(tmp_path / "roberta-base" / "model.safetensors")))
    for t, ref in refs.items():
        model = adapter.load(base, load_file(str(tmp_path / "ft" / t / "model.safetensors")))
        with torch.no_grad():
            mask = (x != 1).long()
            out = ref(input_ids=x, attention_mask=mask)
            torch.testing.assert_close(adapter.logits(model, x, t), out.logits, rtol=0, atol=ATOL)
            torch.testing.assert_close(adapter.features(model, x), ref.roberta(input_ids=x, attention_mask=mask).last_hidden_state[:, 0], rtol=0, atol=ATOL)
            if t == "sst2":
                ref_logits = out.logits
    model = adapter.load(base, refs["sst2"].state_dict())
    _assert_accuracy(adapter, model, ds, "sst2", ref_logits, torch.as_tensor(labels))

    long_row = adapter.collate([list(range(3, 100))])
    assert long_row.shape == (1, 38)  # max_position_embeddings - pad - 1
