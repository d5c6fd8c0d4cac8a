"""Eval datasets: Parquet (image bytes / token ids) and image folders, local, memory:// and S3."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tswitch_ray.errors import ZooError
from tswitch_ray.eval.datasets import (
    EvalDataError,
    ImageFolderDataset,
    ParquetEvalDataset,
    encode_png,
    open_eval_dataset,
    write_image_parquet,
    write_token_parquet,
)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [(12, 12), (10, 15), (16, 9), (8, 8)]
    return [rng.integers(0, 256, sizes[i % len(sizes)] + (3,), dtype=np.uint8) for i in range(n)]


def _write_table(path, cols: dict, row_group_size: int = 4) -> str:
    pq.write_table(pa.table(cols), str(path), row_group_size=row_group_size)
    return str(path)


# ---------------------------------------------------------------- Parquet images


def test_image_parquet_roundtrip_streams_in_batches(tmp_path):
    imgs = _images(10)
    labels = np.arange(10) % 3
    uri = str(tmp_path / "eval.parquet")
    write_image_parquet(uri, imgs, labels, row_group_size=4)
    ds = open_eval_dataset(uri)
    assert isinstance(ds, ParquetEvalDataset)
    assert len(ds) == 10 and ds.modality == "image" and ds.has_labels

    batches = list(ds.batches(3, num_classes=3))
    assert [b.start for b in batches] == [0, 3, 6, 9]
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    got = [np.asarray(im) for b in batches for im in b.items]
    for a, b in zip(got, imgs):
        np.testing.assert_array_equal(a, b)  # PNG is lossless
    assert torch.equal(torch.cat([b.labels for b in batches]), torch.as_tensor(labels))
    assert all(b.labels.dtype == torch.long for b in batches)

    lim = list(ds.batches(4, num_classes=3, limit=5))
    assert [len(b) for b in lim] == [4, 1]
    assert list(ds.batches(4, limit=0)) == []


def test_hf_datasets_image_struct_column(tmp_path):
    imgs = _images(3)
    struct = pa.array([{"bytes": encode_png(a), "path": f"{i}.png"} for i, a in enumerate(imgs)],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    uri = _write_table(tmp_path / "hf.parquet", {"image": struct, "label": pa.array([0, 1, 0], pa.int64())})
    (b,) = list(ParquetEvalDataset(uri).batches(8, num_classes=2))
    for im, a in zip(b.items, imgs):
        np.testing.assert_array_equal(np.asarray(im), a)


def test_unlabelled_split_for_feature_extraction(tmp_path):
    uri = str(tmp_path / "u.parquet")
    write_image_parquet(uri, _images(4), None)
    ds = ParquetEvalDataset(uri)
    assert not ds.has_labels
    (b,) = list(ds.batches(8, require_labels=False))
    assert b.labels is None and len(b) == 4
    with pytest.raises(EvalDataError, match=r"u\.parquet.*missing column 'label'"):
        next(ds.batches(8))


@pytest.mark.parametrize("bad", [b"\x89PNG\r\n\x1a\nnot really a png", "truncated", b""], ids=["garbage", "truncated", "empty"])
def test_corrupt_image_row_is_a_clear_error(tmp_path, bad):
    imgs = _images(6)
    blobs = [encode_png(a) for a in imgs]
    blobs[4] = blobs[4][: len(blobs[4]) // 2] if bad == "truncated" else bad
    uri = _write_table(tmp_path / "bad.parquet", {"image": pa.array(blobs, pa.binary()), "label": pa.array([0] * 6, pa.int64())})
    ds = ParquetEvalDataset(uri)
    it = ds.batches(3, num_classes=2)
    assert len(next(it)) == 3  # rows before the bad one stream fine
    with pytest.raises(EvalDataError) as ei:
        next(it)
    msg = str(ei.value)
    assert uri in msg and "row 4" in msg
    assert ("corrupt image" in msg) or ("empty image" in msg)
    assert isinstance(ei.value, ZooError)  # the CLI reports it as a user error, no traceback


def test_null_image_row(tmp_path):
    blobs = [encode_png(a) for a in _images(3)]
    blobs[1] = None
    uri = _write_table(tmp_path / "null.parquet", {"image": pa.array(blobs, pa.binary()), "label": pa.array([0, 0, 0], pa.int64())})
    with pytest.raises(EvalDataError, match=r"row 1 has an empty image"):
        list(ParquetEvalDataset(uri).batches(8))


def test_label_outside_head_classes(tmp_path):
    labels = [0, 1, 2, 0, 1, 2, 0, 5, 1]
    uri = str(tmp_path / "lab.parquet")
    write_image_parquet(uri, _images(9), labels, row_group_size=4)
    ds = ParquetEvalDataset(uri)
    assert len(list(ds.batches(4, num_classes=6))) == 3  # fine for a 6-class head
    with pytest.raises(EvalDataError) as ei:
        list(ds.batches(4, num_classes=3))
    msg = str(ei.value)
    assert uri in msg and "row 7" in msg and "label 5" in msg and "3 classes" in msg and "0..2" in msg

    uri2 = str(tmp_path / "neg.parquet")
    write_image_parquet(uri2, _images(2), [0, -1])
    with pytest.raises(EvalDataError, match=r"row 1 has label -1"):
        list(ParquetEvalDataset(uri2).batches(4))


def test_null_label(tmp_path):
    uri = _write_table(tmp_path / "nl.parquet", {"image": pa.array([encode_png(a) for a in _images(3)]), "label": pa.array([0, None, 1], pa.int64())})
    with pytest.raises(EvalDataError, match=r"row 1 has a null label"):
        list(ParquetEvalDataset(uri).batches(8))


def test_missing_columns_and_unreadable_files(tmp_path):
    uri = _write_table(tmp_path / "cols.parquet", {"pixels": pa.array([b"x"]), "label": pa.array([0])})
    with pytest.raises(EvalDataError, match=r"cols\.parquet: missing data column.*'image'.*'input_ids'.*pixels"):
        ParquetEvalDataset(uri)
    with pytest.raises(EvalDataError, match=r"nope\.parquet: eval dataset file not found"):
        open_eval_dataset(str(tmp_path / "nope.parquet"))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet at all")
    with pytest.raises(EvalDataError, match=r"junk\.parquet: not a readable Parquet file"):
        open_eval_dataset(str(junk))


# ---------------------------------------------------------------- Parquet tokens


def test_token_parquet_roundtrip(tmp_path):
    rows = [[0, 5, 6, 2], [0, 7, 2], [0, 9, 9, 9, 9, 2], [0, 2]]
    uri = str(tmp_path / "tok.parquet")
    write_token_parquet(uri, rows, [1, 0, 1, 0], row_group_size=2)
    ds = open_eval_dataset(uri)
    assert ds.modality == "text" and len(ds) == 4
    bs = list(ds.batches(3, num_classes=2))
    assert [r for b in bs for r in b.items] == rows
    assert torch.cat([b.labels for b in bs]).tolist() == [1, 0, 1, 0]
    with pytest.raises(EvalDataError, match=r"row 0 has label 1.*1 classes"):
        list(ds.batches(3, num_classes=1))


def test_null_token_row(tmp_path):
    uri = _write_table(tmp_path / "nt.parquet", {"input_ids": pa.array([[0, 2], None], pa.list_(pa.int32())), "label": pa.array([0, 0])})
    with pytest.raises(EvalDataError, match=r"row 1 has null input_ids"):
        list(ParquetEvalDataset(uri).batches(8))


# ---------------------------------------------------------------- image folders


def _write_folder(fs, root: str, per_class: dict[str, list[np.ndarray]], ext: str = "png") -> None:
    for cls, arrs in per_class.items():
        fs.makedirs(f"{root}/{cls}", exist_ok=True)
        for i, a in enumerate(arrs):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG" if ext == "png" else "BMP")
            with fs.open(f"{root}/{cls}/{i:03d}.{ext}", "wb") as f:
                f.write(buf.getvalue())


def test_image_folder_labels_follow_sorted_class_names(tmp_path):
    imgs = _images(5)
    fs = fsspec.filesystem("file")
    root = str(tmp_path / "folder")
    _write_folder(fs, root, {"dog": imgs[:2], "cat": imgs[2:4], "zebra": imgs[4:]}, ext="png")
    (tmp_path / "folder" / "cat" / "notes.txt").write_text("ignored")
    ds = open_eval_dataset(root)
    assert isinstance(ds, ImageFolderDataset)
    assert ds.classes == ["cat", "dog", "zebra"] and len(ds) == 5
    bs = list(ds.batches(2, num_classes=3))
    assert [len(b) for b in bs] == [2, 2, 1] and [b.start for b in bs] == [0, 2, 4]
    assert torch.cat([b.labels for b in bs]).tolist() == [0, 0, 1, 1, 2]
    got = [np.asarray(i) for b in bs for i in b.items]
    for g, a in zip(got, imgs[2:4] + imgs[:2] + imgs[4:]):
        np.testing.assert_array_equal(g, a)
    assert [len(b) for b in ds.batches(2, limit=3)] == [2, 1]

    with pytest.raises(EvalDataError, match=r"3 class folders but the task head has 2 classes.*'zebra'"):
        next(ds.batches(2, num_classes=2))


def test_image_folder_errors(tmp_path):
    with pytest.raises(EvalDataError, match="image folder not found"):
        ImageFolderDataset(str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(encode_png(_images(1)[0]))
    with pytest.raises(EvalDataError, match="no class sub-folders"):
        ImageFolderDataset(str(tmp_path / "flat"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(EvalDataError, match="hold no image files"):
        ImageFolderDataset(str(tmp_path / "empty"))

    root = tmp_path / "corrupt"
    _write_folder(fsspec.filesystem("file"), str(root), {"a": _images(2)})
    (root / "a" / "002.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(EvalDataError, match=r"002\.png holds a corrupt image"):
        list(ImageFolderDataset(str(root)).batches(8))


# ---------------------------------------------------------------- remote URIs


def test_memory_uri_parquet_and_folder():
    imgs = _images(4, seed=3)
    uri = "memory://tswitch-eval-test/split/eval.parquet"
    write_image_parquet(uri, imgs, [0, 1, 0, 1], row_group_size=2)
    ds = open_eval_dataset(uri)
    got = [np.asarray(i) for b in ds.batches(3, num_classes=2) for i in b.items]
    assert len(got) == 4 and all(np.array_equal(g, a) for g, a in zip(got, imgs))

    fs = fsspec.filesystem("memory")
    _write_folder(fs, "/tswitch-eval-test/folder", {"b": imgs[:1], "a": imgs[1:3]}, ext="bmp")
    fds = open_eval_dataset("memory://tswitch-eval-test/folder")
    assert fds.classes == ["a", "b"]
    (b,) = list(fds.batches(8, num_classes=2))
    assert b.labels.tolist() == [0, 0, 1]
    fs.rm("/tswitch-eval-test", recursive=True)


def test_s3_parquet_and_folder(s3_bucket):
    bucket, so = s3_bucket
    imgs = _images(5, seed=4)
    uri = f"{bucket}/evals/dtd/eval.parquet"
    write_image_parquet(uri, imgs, [0, 1, 2, 0, 1], storage_options=so, row_group_size=2)
    ds = open_eval_dataset(uri, so)
    bs = list(ds.batches(2, num_classes=3))
    assert [len(b) for b in bs] == [2, 2, 1]
    assert all(np.array_equal(np.asarray(g), a) for g, a in zip((i for b in bs for i in b.items), imgs))
    with pytest.raises(EvalDataError, match=r"s3://.*eval\.parquet: row 2 has label 2"):
        list(ds.batches(2, num_classes=2))

    tok = f"{bucket}/evals/sst2/eval.parquet"
    write_token_parquet(tok, [[0, 4, 2], [0, 2]], [1, 0], storage_options=so)
    assert [r for b in open_eval_dataset(tok, so).batches(8) for r in b.items] == [[0, 4, 2], [0, 2]]

    import s3fs

    fs = s3fs.S3FileSystem(**so)
    root = bucket[len("s3://"):] + "/folder"
    _write_folder(fs, root, {"x": imgs[:2], "y": imgs[2:3]})
    fds = open_eval_dataset(f"{bucket}/folder", so)
    assert fds.classes == ["x", "y"]
    (b,) = list(fds.batches(8, num_classes=2))
    assert b.labels.tolist() == [0, 0, 1]
