"""Zoo: selection, validation errors, fingerprint, check_finite, and a zoo on a real S3 server."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from tswitch_ray.errors import ZooError
from tswitch_ray.zoo import ShardedSafetensorsReader, Zoo, check_finite, load_zoo, save_safetensors, save_sharded


def _base(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "visual.conv1.weight": torch.randn(16, 3, 4, 4, generator=g),
        "visual.blocks.0.attn.weight": torch.randn(48, 16, generator=g),
        "visual.blocks.0.attn.bias": torch.randn(48, generator=g),
        "visual.blocks.0.mlp.weight": torch.randn(64, 16, generator=g),
        "visual.ln_post.weight": torch.ones(16),
        "text.token_embedding": torch.randn(100, 16, generator=g),
    }


def _task(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}


def _write_zoo(folder, base, tasks: dict[str, dict], extra_yaml: str = "") -> str:
    save_file(base, str(folder / "base.safetensors"))
    lines = ["name: test-zoo", "base: base.safetensors", "tasks:"]
    for name, sd in tasks.items():
        save_file(sd, str(folder / f"{name}.safetensors"))
        lines.append(f"  - {{name: {name}, uri: {name}.safetensors}}")
    (folder / "zoo.yaml").write_text("\n".join(lines) + "\n" + extra_yaml)
    return str(folder / "zoo.yaml")


def test_validate_and_selection_in_file_order(tmp_path):
    base = _base()
    m = _write_zoo(tmp_path, base, {"cars": _task(base, 1), "dtd": _task(base, 2)},
                   'include: ["visual.*"]\nexclude: ["*.bias"]\n')
    zoo = load_zoo(m)
    infos = zoo.validate()
    expected = [n for n in zoo.base.infos() if n.startswith("visual.") and not n.endswith(".bias")]
    assert list(infos) == expected == list(zoo.tensor_infos())
    assert zoo.task_names == ["cars", "dtd"]
    assert torch.equal(zoo.read("visual.ln_post.weight"), base["visual.ln_post.weight"])
    t = _task(base, 2)["visual.conv1.weight"]
    assert torch.equal(zoo.read("visual.conv1.weight", "dtd"), t)
    with pytest.raises(ZooError, match="no task 'nope'"):
        zoo.read("visual.conv1.weight", "nope")
    z2 = pickle.loads(pickle.dumps(zoo))
    assert z2.validate() == infos


def test_missing_tensor_in_task(tmp_path):
    base = _base()
    bad = _task(base, 1)
    del bad["visual.blocks.0.mlp.weight"]
    m = _write_zoo(tmp_path, base, {"cars": _task(base, 3), "dtd": bad})
    with pytest.raises(ZooError) as ei:
        load_zoo(m).validate()
    msg = str(ei.value)
    assert "task 'dtd'" in msg and str(tmp_path / "dtd.safetensors") in msg
    assert "'visual.blocks.0.mlp.weight'" in msg and "has no tensor" in msg
    # excluding the tensor makes the zoo valid
    load_zoo(_write_zoo(tmp_path, base, {"dtd": bad}, 'exclude: ["*.mlp.*"]\n')).validate()


def test_shape_mismatch_names_both_files(tmp_path):
    base = _base()
    bad = _task(base, 1)
    bad["visual.blocks.0.attn.weight"] = torch.randn(32, 16)
    m = _write_zoo(tmp_path, base, {"cars": bad})
    with pytest.raises(ZooError) as ei:
        load_zoo(m).validate()
    msg = str(ei.value)
    assert "shape mismatch" in msg and "'visual.blocks.0.attn.weight'" in msg
    assert str(tmp_path / "cars.safetensors") in msg and str(tmp_path / "base.safetensors") in msg
    assert "[32, 16]" in msg and "[48, 16]" in msg


def test_dtype_mismatch(tmp_path):
    base = _base()
    bad = _task(base, 1)
    bad["visual.ln_post.weight"] = bad["visual.ln_post.weight"].half()
    m = _write_zoo(tmp_path, base, {"cars": bad})
    with pytest.raises(ZooError) as ei:
        load_zoo(m).validate()
    msg = str(ei.value)
    assert "dtype mismatch" in msg and "F16" in msg and "F32" in msg and "'visual.ln_post.weight'" in msg


def test_missing_task_file_and_problem_count(tmp_path):
    base = _base()
    m = _write_zoo(tmp_path, base, {"cars": _task(base, 1), "dtd": _task(base, 2)})
    (tmp_path / "cars.safetensors").unlink()
    (tmp_path / "dtd.safetensors").unlink()
    with pytest.raises(ZooError) as ei:
        load_zoo(m).validate()
    msg = str(ei.value)
    assert "task 'cars'" in msg and str(tmp_path / "cars.safetensors") in msg and "does not exist" in msg
    assert "1 more problem" in msg


def test_missing_base_file(tmp_path):
    base = _base()
    m = _write_zoo(tmp_path, base, {"cars": _task(base, 1)})
    (tmp_path / "base.safetensors").unlink()
    with pytest.raises(ZooError, match="base checkpoint") as ei:
        load_zoo(m).validate()
    assert str(tmp_path / "base.safetensors") in str(ei.value)


def test_no_tensor_selected(tmp_path):
    base = _base()
    m = _write_zoo(tmp_path, base, {"cars": _task(base, 1)}, 'include: ["vision.*"]\n')
    with pytest.raises(ZooError, match="select none of the 6 tensors") as ei:
        load_zoo(m).validate()
    assert m in str(ei.value)


def test_fingerprint(tmp_path):
    base = _base()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    zoo_a = load_zoo(_write_zoo(tmp_path / "a", base, {"t": _task(base, 1)}))
    fp = zoo_a.fingerprint()
    assert len(fp) == 64 and fp == zoo_a.fingerprint()
    # Same base as a .pt state dict in another order, other tasks: same fingerprint.
    reordered = dict(reversed(list(base.items())))
    torch.save(reordered, str(tmp_path / "b" / "base.pt"))
    zoo_b = Zoo.from_uris("other", str(tmp_path / "b" / "base.pt"), {"x": str(tmp_path / "a" / "t.safetensors")})
    assert zoo_b.fingerprint() == fp
    # One element changed in the sampled head of a big tensor: different fingerprint.
    big = dict(base)
    big["text.token_embedding"] = base["text.token_embedding"].clone()
    big["text.token_embedding"][0, 0] += 1.0
    zoo_c = load_zoo(_write_zoo(tmp_path / "c", big, {"t": _task(big, 1)}))
    assert zoo_c.fingerprint() != fp
    # Another tensor selection: different fingerprint.
    zoo_d = Zoo(zoo_a.name, zoo_a.base, zoo_a.tasks, include=["visual.*"])
    assert zoo_d.fingerprint() != fp


def test_fingerprint_samples_head_and_tail_of_large_tensors(tmp_path):
    base = {"w": torch.zeros(200_000)}  # 800 KB: only 2 x 64 KiB are hashed
    fps = []
    for i, pos in enumerate([0, 100_000, 199_999, None]):
        sd = {"w": base["w"].clone()}
        if pos is not None:
            sd["w"][pos] = 1.0
        save_file(sd, str(tmp_path / f"b{i}.safetensors"))
        fps.append(Zoo.from_uris("z", str(tmp_path / f"b{i}.safetensors"), {"t": "unused.safetensors"}).fingerprint())
    head, middle, tail, clean = fps
    assert head != clean and tail != clean and head != tail
    assert middle == clean  # documented: the middle of large tensors is not sampled


def test_check_finite():
    check_finite(torch.randn(10), "f.safetensors", "w")
    check_finite(torch.arange(5), "f.safetensors", "ids")
    t = torch.randn(10)
    t[3] = float("nan")
    t[4] = float("inf")
    t[5] = float("-inf")
    with pytest.raises(ZooError) as ei:
        check_finite(t.half(), "f.safetensors", "w")
    msg = str(ei.value)
    assert "f.safetensors" in msg and "'w'" in msg and "1 NaN and 2 infinite" in msg


@pytest.mark.s3
def test_zoo_on_s3(s3_bucket, tmp_path):
    bucket, opts = s3_bucket
    base = _base(7)
    tasks = {"cars": _task(base, 1), "dtd": _task(base, 2), "hf": _task(base, 3), "pt": _task(base, 4)}
    save_safetensors(base, f"{bucket}/shared/base.safetensors", opts)
    for name in ("cars", "dtd"):
        save_safetensors(tasks[name], f"{bucket}/zoo1/ckpt/{name}.safetensors", opts)
    save_sharded(tasks["hf"], f"{bucket}/zoo1/ckpt/hf", max_shard_bytes=4096, storage_options=opts)
    import io

    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    buf = io.BytesIO()
    torch.save(tasks["pt"], buf)
    fs.pipe_file(f"{bucket[5:]}/zoo1/ckpt/pt.pt", buf.getvalue())
    manifest = (
        "name: s3-zoo\nbase: ../shared/base.safetensors\ntasks:\n"
        "  - {name: cars, uri: ckpt/cars.safetensors}\n"
        f"  - {{name: dtd, uri: {bucket}/zoo1/ckpt/dtd.safetensors}}\n"
        "  - {name: hf, uri: ckpt/hf}\n"
        "  - {name: pt, uri: ./ckpt/pt.pt}\n"
    )
    fs.pipe_file(f"{bucket[5:]}/zoo1/zoo.yaml", manifest.encode())
    zoo = load_zoo(f"{bucket}/zoo1/zoo.yaml", storage_options=opts)
    assert zoo.base.uri == f"{bucket}/shared/base.safetensors"
    assert zoo.tasks["cars"].uri == f"{bucket}/zoo1/ckpt/cars.safetensors"
    assert isinstance(zoo.tasks["hf"].inner, ShardedSafetensorsReader)
    assert len(fs.ls(f"{bucket[5:]}/zoo1/ckpt/hf")) > 2  # really sharded
    infos = zoo.validate()
    assert list(infos) == list(zoo.base.infos())
    for name in infos:
        assert torch.equal(zoo.read(name), base[name])
        for task in tasks:
            assert torch.equal(zoo.read(name, task), tasks[task][name])
    # same base locally: same fingerprint (content sampled over ranged GETs)
    local = tmp_path / "base.safetensors"
    save_file(base, str(local))
    assert zoo.fingerprint() == Zoo.from_uris("l", str(local), {"t": str(local)}).fingerprint()
    # a missing task object on S3 is named
    bad = load_zoo(f"{bucket}/zoo1/zoo.yaml", storage_options=opts)
    bad.tasks["cars"] = type(bad.tasks["cars"].inner)(f"{bucket}/zoo1/ckpt/gone.safetensors", opts)
    with pytest.raises(ZooError, match="gone.safetensors"):
        bad.validate()
