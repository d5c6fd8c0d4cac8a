"""`tswitch zoo convert`: explicit, one-time conversion of pickled whole-module checkpoints (task_vectors) to safetensors."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tswitch_ray.cli import app
from tswitch_ray.errors import ZooError
from tswitch_ray.eval.adapters import adapter_from_spec, load_head
from tswitch_ray.eval.datasets import open_eval_dataset, write_image_parquet
from tswitch_ray.zoo.convert import convert_checkpoint

TINY = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1},
}

# The shape of task_vectors' src/modeling.py: whole modules are torch.save'd.
MODELING = '''
import torch
import open_clip


class ImageEncoder(torch.nn.Module):
    def __init__(self, cfg, keep_lang=False):
        super().__init__()
        self.model = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=cfg["quick_gelu"])
        self.cache_dir = "/nonexistent/cache"
        if not keep_lang and hasattr(self.model, "transformer"):
            delattr(self.model, "transformer")

    def forward(self, images):
        return self.model.encode_image(images)


class ClassificationHead(torch.nn.Linear):
    def __init__(self, normalize, weights, biases=None):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
        self.bias = torch.nn.Parameter(biases.clone() if biases is not None else torch.zeros_like(self.bias))

    def forward(self, inputs):
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)
'''


@pytest.fixture
def tv_src(tmp_path, monkeypatch):
    """A fake task_vectors ``src`` package on sys.path; yields its ``modeling`` module."""
    pkg = tmp_path / "tvsrc" / "tv_fake_src"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "modeling.py").write_text(textwrap.dedent(MODELING))
    monkeypatch.syspath_prepend(str(tmp_path / "tvsrc"))
    import tv_fake_src.modeling as modeling

    yield modeling
    for name in [m for m in sys.modules if m.startswith("tv_fake_src")]:
        del sys.modules[name]


@pytest.fixture
def pickled(tmp_path, tv_src):
    torch.manual_seed(0)
    enc = tv_src.ImageEncoder(TINY).eval()
    src = tmp_path / "zoo" / "finetuned.pt"
    src.parent.mkdir()
    torch.save(enc, src)  # what task_vectors does: the whole module
    g = torch.Generator().manual_seed(1)
    head = tv_src.ClassificationHead(True, torch.randn(4, 16, generator=g), torch.randn(4, generator=g))
    torch.save(head, tmp_path / "zoo" / "head_cars.pt")
    return enc, head, src


def test_refused_without_trust_pickle(tmp_path, pickled, monkeypatch):
    _, _, src = pickled
    dst = tmp_path / "out" / "finetuned.safetensors"

    real_load = torch.load

    def boom(*a, **k):  # nothing may be unpickled before the user opts in (weights_only runs no pickled code)
        if not k.get("weights_only"):
            raise AssertionError("torch.load called without weights_only before --trust-pickle")
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", boom)
    with pytest.raises(ZooError) as ei:
        convert_checkpoint(str(src), str(dst))
    msg = str(ei.value)
    assert str(src) in msg and "--trust-pickle" in msg and "arbitrary" in msg
    assert not dst.exists() and not dst.parent.exists()

    res = CliRunner().invoke(app, ["zoo", "convert", str(src), str(dst)])
    assert res.exit_code != 0
    out = res.output  # click >= 8.2 mixes stderr into output
    assert "--trust-pickle" in " ".join(out.split()) and "Traceback" not in out
    assert not dst.exists()


def test_convert_whole_module_then_open_clip_adapter(tmp_path, pickled):
    enc, head, src = pickled
    dst = tmp_path / "out" / "finetuned.safetensors"
    res = CliRunner().invoke(app, ["zoo", "convert", str(src), str(dst), "--trust-pickle"])
    assert res.exit_code == 0, res.output
    tensors = load_file(str(dst))
    assert set(tensors) == set(enc.state_dict())
    assert "model.visual.conv1.weight" in tensors and not any(k.startswith("model.transformer.") for k in tensors)
    for k, v in enc.state_dict().items():
        assert torch.equal(tensors[k], v), k

    # the task_vectors zero-shot head converts the same way and loads as a LinearHead (normalised by default)
    shapes = convert_checkpoint(str(tmp_path / "zoo" / "head_cars.pt"), str(tmp_path / "heads" / "cars.safetensors"), trust_pickle=True)
    assert shapes == {"weight": (4, 16), "bias": (4,)}
    assert load_head(str(tmp_path / "heads" / "cars.safetensors")).normalize

    adapter = adapter_from_spec({"kind": "open_clip", "model": TINY, "heads": "heads"}, str(tmp_path))
    model = adapter.build(tensors)
    uri = str(tmp_path / "eval.parquet")
    rng = np.random.default_rng(0)
    write_image_parquet(uri, [rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) for _ in range(3)], [0, 3, 1])
    items = [im for b in open_eval_dataset(uri).batches(8, num_classes=4) for im in b.items]
    x = adapter.collate(items)
    with torch.no_grad():
        torch.testing.assert_close(adapter.features(model, x), enc(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(adapter.logits(model, x, "cars"), head(enc(x)), rtol=0, atol=1e-5)


def test_convert_plain_state_dicts(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3), "step": 7}
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pt")
    torch.save(sd, tmp_path / "plain.bin")
    for name in ("wrapped.pt", "plain.bin"):
        dst = tmp_path / (name + ".safetensors")
        assert convert_checkpoint(str(tmp_path / name), str(dst), trust_pickle=True) == {"a.weight": (3, 2), "a.bias": (3,)}
        got = load_file(str(dst))
        assert torch.equal(got["a.weight"], sd["a.weight"]) and torch.equal(got["a.bias"], sd["a.bias"])


def test_convert_tied_and_noncontiguous_tensors(tmp_path):
    w = torch.randn(4, 3)
    sd = {"emb.weight": w, "lm_head.weight": w, "t": torch.randn(3, 4).T}
    torch.save(sd, tmp_path / "tied.pt")
    convert_checkpoint(str(tmp_path / "tied.pt"), str(tmp_path / "tied.safetensors"), trust_pickle=True)
    got = load_file(str(tmp_path / "tied.safetensors"))
    assert torch.equal(got["emb.weight"], w) and torch.equal(got["lm_head.weight"], w) and torch.equal(got["t"], sd["t"])


def test_convert_errors_are_clear_and_write_nothing(tmp_path, pickled):
    _, _, src = pickled
    # the defining package is not importable (task_vectors' src not on the path)
    for name in [m for m in sys.modules if m.startswith("tv_fake_src")]:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if not p.endswith("tvsrc")]
    dst = tmp_path / "x.safetensors"
    with pytest.raises(ZooError, match=r"cannot be unpickled here.*tv_fake_src.*PYTHONPATH"):
        convert_checkpoint(str(src), str(dst), trust_pickle=True)
    assert not dst.exists()

    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ZooError, match=r"corrupt\.pt is not a readable torch checkpoint"):
        convert_checkpoint(str(bad), str(dst), trust_pickle=True)
    with pytest.raises(ZooError, match=r"does not exist"):
        convert_checkpoint(str(tmp_path / "missing.pt"), str(dst), trust_pickle=True)
    with pytest.raises(ZooError, match=r"must be a \.safetensors"):
        convert_checkpoint(str(src), str(tmp_path / "x.pt"), trust_pickle=True)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ZooError, match=r"holds a list"):
        convert_checkpoint(str(tmp_path / "list.pt"), str(dst), trust_pickle=True)
    torch.save({"note": "no tensors"}, tmp_path / "empty.pt")
    with pytest.raises(ZooError, match=r"contains no tensors"):
        convert_checkpoint(str(tmp_path / "empty.pt"), str(dst), trust_pickle=True)
    assert not dst.exists()
    res = CliRunner().invoke(app, ["zoo", "convert", str(bad), str(dst), "--trust-pickle"])
    assert res.exit_code != 0 and "Traceback" not in res.output and not dst.exists()


def test_convert_from_memory_uri(tmp_path):
    import fsspec

    sd = {"w": torch.arange(6.0).view(2, 3)}
    torch.save(sd, tmp_path / "m.pt")
    fs = fsspec.filesystem("memory")
    fs.pipe("/tswitch-convert/m.pt", (tmp_path / "m.pt").read_bytes())
    convert_checkpoint("memory://tswitch-convert/m.pt", "memory://tswitch-convert/m.safetensors", trust_pickle=True)
    from safetensors.torch import load

    assert torch.equal(load(fs.cat("/tswitch-convert/m.safetensors"))["w"], sd["w"])
    fs.rm("/tswitch-convert", recursive=True)


def test_convert_several_files_into_a_folder(tmp_path, pickled):
    """`zoo convert A B C --out-dir D`: state dicts need no trust; a whole module does; each file is whole or absent."""
    enc, head, src = pickled
    torch.manual_seed(1)
    plain = {"a.weight": torch.randn(5, 3), "a.bias": torch.randn(5), "half": torch.randn(4).half()}
    torch.save(plain, tmp_path / "zoo" / "plain.bin")
    srcs = [str(src), str(tmp_path / "zoo" / "plain.bin"), str(tmp_path / "zoo" / "head_cars.pt")]
    out_dir = tmp_path / "converted"

    res = CliRunner().invoke(app, ["zoo", "convert", str(tmp_path / "zoo" / "plain.bin"), "--out-dir", str(out_dir)])
    assert res.exit_code == 0, res.output  # a plain state dict: read with weights_only, no --trust-pickle needed
    got = load_file(str(out_dir / "plain.safetensors"))
    assert got.keys() == plain.keys() and all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in plain.items())

    res = CliRunner().invoke(app, ["zoo", "convert", *srcs, "--out-dir", str(out_dir), "--trust-pickle"])
    assert res.exit_code == 0, res.output
    assert res.stdout.count("wrote") == 3
    tensors = load_file(str(out_dir / "finetuned.safetensors"))
    assert set(tensors) == set(enc.state_dict()) and all(torch.equal(tensors[k], v) for k, v in enc.state_dict().items())
    assert torch.equal(load_file(str(out_dir / "head_cars.safetensors"))["weight"], head.weight)
    assert sorted(p.name for p in out_dir.iterdir()) == ["finetuned.safetensors", "head_cars.safetensors", "plain.safetensors"]


def test_convert_several_files_refuses_clashing_names_and_missing_out_dir(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        torch.save({"w": torch.ones(2)}, tmp_path / d / "model.pt")
    res = CliRunner().invoke(app, ["zoo", "convert", str(tmp_path / "a" / "model.pt"), str(tmp_path / "b" / "model.pt"),
                                   "--out-dir", str(tmp_path / "out")])
    assert res.exit_code == 2 and "would both be converted to" in " ".join(res.output.split())
    assert not (tmp_path / "out").exists()  # checked before the first conversion
    res = CliRunner().invoke(app, ["zoo", "convert", str(tmp_path / "a" / "model.pt"), str(tmp_path / "b" / "model.pt")])
    assert res.exit_code == 2 and "--out-dir" in res.output and "Traceback" not in res.output
