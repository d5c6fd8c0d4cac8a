"""Checkpoint readers and writers on real files made here (safetensors, sharded, .pt)."""

from __future__ import annotations

import json
import os
import pickle
import struct

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tswitch_ray.errors import ZooError
from tswitch_ray.zoo import (
    SafetensorsReader,
    SafetensorsStreamWriter,
    ShardedSafetensorsReader,
    TensorInfo,
    TorchStateDictReader,
    open_checkpoint,
    save_safetensors,
    save_sharded,
)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.weight": torch.randn(64, 48, generator=g),
        "enc.bias": torch.randn(64, generator=g).half(),
        "dec.weight": torch.randn(48, 64, generator=g).bfloat16(),
        "pos_ids": torch.arange(77, dtype=torch.int64).reshape(1, 77),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 5),
        "mask": torch.rand(10, generator=g) > 0.5,
    }


EXPECTED_DTYPES = {
    "enc.weight": "F32",
    "enc.bias": "F16",
    "dec.weight": "BF16",
    "pos_ids": "I64",
    "scalar": "F64",
    "empty": "F32",
    "mask": "BOOL",
}


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)


def _check_reader(reader, sd: dict[str, torch.Tensor]) -> None:
    infos = reader.infos()
    assert set(infos) == set(sd)
    for name, t in sd.items():
        info = infos[name]
        assert info == TensorInfo(name, tuple(t.shape), EXPECTED_DTYPES[name], t.numel() * t.element_size())
        _assert_same(reader.read(name), t)


def test_safetensors_reader_all_dtypes(tmp_path):
    sd = _state()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))  # the reference writer, not ours
    reader = open_checkpoint(str(path))
    assert isinstance(reader, SafetensorsReader)
    _check_reader(reader, sd)
    # infos are ordered as stored: by data offset
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    by_offset = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    assert list(reader.infos()) == by_offset
    # read() hands out owned, writable memory
    t = reader.read("enc.weight")
    t.add_(1)
    _assert_same(reader.read("enc.weight"), sd["enc.weight"])


def test_safetensors_reader_is_picklable_and_works_via_file_url(tmp_path):
    sd = _state(1)
    save_file(sd, str(tmp_path / "m.safetensors"))
    reader = open_checkpoint(f"file://{tmp_path}/m.safetensors")
    reader.infos()
    clone = pickle.loads(pickle.dumps(reader))
    _check_reader(clone, sd)


def test_infos_from_header_only_and_read_touches_only_its_bytes(tmp_path):
    """Every tensor's bytes but one are overwritten with garbage: infos and that one tensor still read."""
    sd = {f"t{i}": torch.full((1000,), float(i)) for i in range(5)}
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    for name, entry in header.items():
        if name in ("__metadata__", "t3"):
            continue
        b, e = entry["data_offsets"]
        raw[8 + n + b : 8 + n + e] = os.urandom(e - b)
    path.write_bytes(bytes(raw))
    reader = SafetensorsReader(str(path))
    assert reader.infos()["t0"].shape == (1000,)
    _assert_same(reader.read("t3"), sd["t3"])
    assert not torch.equal(reader.read("t1"), sd["t1"])  # garbage really is there


def test_read_fetches_exactly_one_tensor_range(tmp_path, monkeypatch):
    sd = {f"t{i}": torch.randn(256, 256) for i in range(8)}  # 256 KiB each, 2 MiB file
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    calls: list[tuple] = []
    orig = LocalFileSystem.cat_file

    def counting(self, p, start=None, end=None, **kw):
        out = orig(self, p, start=start, end=end, **kw)
        calls.append((start, end, len(out)))
        return out

    monkeypatch.setattr(LocalFileSystem, "cat_file", counting)
    reader = SafetensorsReader(str(path))
    reader.infos()
    header_bytes = sum(c[2] for c in calls)
    assert len(calls) == 1 and header_bytes <= 256 * 1024  # one small ranged read for the header
    calls.clear()
    import tswitch_ray.io.safetensors as readers_mod

    orig_local = readers_mod._read_local

    def counting_local(p, offset, size):
        out = orig_local(p, offset, size)
        calls.append((offset, offset + size, len(out)))
        return out

    # Local tensor data is read with readinto (no fsspec bytes copy): one read of exactly the tensor's bytes.
    monkeypatch.setattr(readers_mod, "_read_local", counting_local)
    _assert_same(reader.read("t5"), sd["t5"])
    assert [c[2] for c in calls] == [256 * 256 * 4]


def _write_raw(path, header: dict, data: bytes, header_len: int | None = None) -> None:
    hb = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb) if header_len is None else header_len))
        f.write(hb)
        f.write(data)


def test_missing_file(tmp_path):
    p = str(tmp_path / "missing.safetensors")
    with pytest.raises(ZooError, match="does not exist") as ei:
        SafetensorsReader(p).infos()
    assert p in str(ei.value)


@pytest.mark.parametrize(
    "make, needle, tensor",
    [
        (lambda p: p.write_bytes(b"abc"), "too short", None),
        (lambda p: _write_raw(p, {"a": {}}, b"", header_len=10**12), "declares a", None),
        (lambda p: p.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16), "not valid JSON", None),
        (lambda p: _write_raw(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 12),
         "span 12 bytes but shape [4] of F32 needs 16", "w"),
        (lambda p: _write_raw(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 10),
         "truncated", "w"),
        (lambda p: _write_raw(p, {"w": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4),
         "unsupported dtype", "w"),
        (lambda p: _write_raw(p, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
         "shape must be", "w"),
    ],
)
def test_bad_safetensors_files(tmp_path, make, needle, tensor):
    p = tmp_path / "bad.safetensors"
    make(p)
    with pytest.raises(ZooError) as ei:
        SafetensorsReader(str(p)).infos()
    msg = str(ei.value)
    assert str(p) in msg and needle in msg
    if tensor:
        assert f"tensor '{tensor}'" in msg


def test_truncated_real_file_names_the_cut_tensor(tmp_path):
    sd = {"a": torch.randn(100), "b": torch.randn(100)}
    p = tmp_path / "cut.safetensors"
    save_file(sd, str(p))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ZooError, match="truncated") as ei:
        SafetensorsReader(str(p)).infos()
    assert "tensor 'b'" in str(ei.value) and str(p) in str(ei.value)


def test_file_shrinking_after_header_read_is_caught(tmp_path):
    sd = {"a": torch.randn(100), "b": torch.randn(100)}
    p = tmp_path / "m.safetensors"
    save_file(sd, str(p))
    reader = SafetensorsReader(str(p))
    reader.infos()
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ZooError, match="tensor 'b'"):
        reader.read("b")


def test_unknown_tensor_name(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ZooError, match="no tensor 'zz'"):
        SafetensorsReader(str(tmp_path / "m.safetensors")).read("zz")


def test_sharded_folder_with_index(tmp_path):
    """An HF-style folder written with the reference safetensors writer and a hand-written index."""
    sd = _state(2)
    names = list(sd)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    weight_map = {}
    for fname, ns in shards.items():
        save_file({n: sd[n] for n in ns}, str(tmp_path / fname))
        weight_map.update({n: fname for n in ns})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    reader = open_checkpoint(str(tmp_path))
    assert isinstance(reader, ShardedSafetensorsReader)
    _check_reader(reader, sd)
    # the index file's own path works as well
    _check_reader(open_checkpoint(str(tmp_path / "model.safetensors.index.json")), sd)


def test_sharded_index_pointing_at_wrong_shard(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}})
    )
    with pytest.raises(ZooError, match="maps tensor 'b'") as ei:
        open_checkpoint(str(tmp_path)).infos()
    assert "s1.safetensors" in str(ei.value)


def test_sharded_missing_shard_file(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})
    )
    with pytest.raises(ZooError, match="does not exist") as ei:
        open_checkpoint(str(tmp_path)).infos()
    assert "s2.safetensors" in str(ei.value)


def test_folder_with_single_model_safetensors(tmp_path):
    sd = _state(3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    reader = open_checkpoint(str(tmp_path) + "/")
    assert isinstance(reader, ShardedSafetensorsReader)
    _check_reader(reader, sd)


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ZooError, match="no model.safetensors.index.json"):
        open_checkpoint(str(tmp_path))
    with pytest.raises(ZooError, match="does not exist"):
        open_checkpoint(str(tmp_path / "nothing_here"))
    with pytest.raises(ZooError, match="unknown format"):
        open_checkpoint(str(tmp_path / "readme.txt"))


def test_save_sharded_roundtrip(tmp_path):
    sd = _state(4)
    out = save_sharded(sd, str(tmp_path / "hf"), max_shard_bytes=10_000)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and len(files) >= 3
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    for name, fname in index["weight_map"].items():  # shards readable by the reference reader
        _assert_same(load_file(str(tmp_path / "hf" / fname))[name], sd[name])
    _check_reader(open_checkpoint(out), sd)
    single = save_sharded(sd, str(tmp_path / "hf1"))
    assert os.listdir(single) == ["model.safetensors"]
    _check_reader(open_checkpoint(single), sd)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("zipfile", [True, False])
def test_torch_state_dict_reader(tmp_path, nested, zipfile):
    sd = _state(5)
    obj = {"state_dict": sd, "epoch": 3} if nested else {**sd, "note": "not a tensor"}
    p = tmp_path / "m.pt"
    torch.save(obj, str(p), _use_new_zipfile_serialization=zipfile)
    reader = open_checkpoint(str(p))
    assert isinstance(reader, TorchStateDictReader)
    _check_reader(reader, sd)
    assert list(reader.infos()) == list(sd)  # ordered as stored
    _check_reader(pickle.loads(pickle.dumps(reader)), sd)


def test_torch_reader_shared_tensors_are_not_aliased(tmp_path):
    w = torch.randn(4, 4)
    torch.save({"a": w, "b": w}, str(tmp_path / "tied.bin"))
    reader = open_checkpoint(str(tmp_path / "tied.bin"))
    a = reader.read("a")
    a.zero_()
    _assert_same(reader.read("b"), w)


def test_remote_readers_over_memory_fs():
    fs = fsspec.filesystem("memory")
    sd = _state(6)
    save_safetensors(sd, "memory://ckpts/m.safetensors", metadata={"k": "v"})
    buf = __import__("io").BytesIO()
    torch.save(sd, buf)
    fs.pipe_file("/ckpts/m.pt", buf.getvalue())
    st = open_checkpoint("memory://ckpts/m.safetensors")
    _check_reader(st, sd)
    assert st.metadata() == {"k": "v"}
    _check_reader(open_checkpoint("memory://ckpts/m.pt"), sd)


class _Payload:
    """Unpickling this calls os.mkdir(marker): the stand-in for arbitrary code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    armed = tmp_path / "armed.pt"
    torch.save({"w": torch.zeros(3), "x": _Payload(str(tmp_path / "proof_marker"))}, str(armed))
    # The payload is live: an unrestricted load does run it.
    torch.load(str(armed), weights_only=False)
    assert (tmp_path / "proof_marker").is_dir()

    marker = tmp_path / "pwned_marker"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(3), "x": _Payload(str(marker))}, str(evil))
    reader = open_checkpoint(str(evil))
    with pytest.raises(ZooError) as ei:
        reader.infos()
    msg = str(ei.value)
    assert str(evil) in msg and "--trust-pickle" in msg and "tswitch zoo convert" in msg
    with pytest.raises(ZooError):
        reader.read("w")
    assert not marker.exists()


def test_corrupt_pt(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ZooError) as ei:
        open_checkpoint(str(p)).infos()
    assert str(p) in str(ei.value)
    with pytest.raises(ZooError, match="does not exist"):
        open_checkpoint(str(tmp_path / "none.pt")).infos()


def test_pt_without_state_dict(tmp_path):
    torch.save([torch.zeros(2)], str(tmp_path / "list.pt"))
    with pytest.raises(ZooError, match="not a state dict"):
        open_checkpoint(str(tmp_path / "list.pt")).infos()


def test_save_safetensors_atomic_and_shared(tmp_path):
    w = torch.randn(6, 6)
    sd = {"a": w, "b": w, "c": w[:2], "d": w.t()}  # shared, view, non-contiguous
    out = tmp_path / "sub" / "o.safetensors"
    save_safetensors(sd, str(out))
    assert os.listdir(tmp_path / "sub") == ["o.safetensors"]  # no temp file left
    loaded = load_file(str(out))
    for k, v in sd.items():
        _assert_same(loaded[k], v.contiguous())


def test_stream_writer_is_valid_safetensors(tmp_path):
    sd = _state(7)
    out = str(tmp_path / "s.safetensors")
    layout = [(k, tuple(v.shape), EXPECTED_DTYPES[k]) for k, v in sd.items()]
    with SafetensorsStreamWriter(out, layout, metadata={"who": "test"}) as w:
        for k, v in sd.items():
            w.write(k, v)
    with safe_open(out, framework="pt") as f:  # the reference reader accepts it
        assert f.metadata() == {"who": "test"}
        for k, v in sd.items():
            _assert_same(f.get_tensor(k), v)
    assert list(SafetensorsReader(out).infos()) == list(sd)  # written order is file order


def test_stream_writer_abort_and_order_errors(tmp_path):
    out = tmp_path / "s.safetensors"
    layout = [("a", (2,), "F32"), ("b", (3,), "F32")]
    with pytest.raises(RuntimeError):
        with SafetensorsStreamWriter(str(out), layout) as w:
            w.write("a", torch.zeros(2))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    w = SafetensorsStreamWriter(str(out), layout)
    with pytest.raises(ZooError, match="expected 'a' next"):
        w.write("b", torch.zeros(3))
    with pytest.raises(ZooError, match="layout says"):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(ZooError, match="never written"):
        w.close()
    assert os.listdir(tmp_path) == []


def test_writers_finish_all_or_none(tmp_path):
    from tswitch_ray.io.safetensors import all_or_none

    layout = [("a", (2,), "F32")]
    paths = [str(tmp_path / f"{i}.safetensors") for i in range(3)]
    with pytest.raises(ZooError, match="layout says"):
        with all_or_none(SafetensorsStreamWriter(p, layout) for p in paths) as ws:
            ws[0].write("a", torch.zeros(2))
            ws[1].write("a", torch.zeros(3))  # wrong shape: every file must vanish, the good one too
    assert os.listdir(tmp_path) == []
    with all_or_none(SafetensorsStreamWriter(p, layout) for p in paths) as ws:
        for w in ws:
            w.write("a", torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["0.safetensors", "1.safetensors", "2.safetensors"]
