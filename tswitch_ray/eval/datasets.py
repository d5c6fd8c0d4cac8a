"""Evaluation datasets: Parquet files or image folders on any fsspec URI, streamed in batches.

Formats:

* Parquet with a ``label`` integer column and either ``image`` (encoded image
  bytes, PNG/JPEG/...; a Hugging Face ``datasets`` image struct
  ``{bytes, path}`` works too) or ``input_ids`` (``list<int>``). Read with
  ``pyarrow.ParquetFile.iter_batches``, so memory is bounded by the batch size.
* An image folder ``root/<class_name>/*.png`` (also jpg/jpeg/bmp/webp):
  labels are the indices of the class folders in sorted order (torchvision's
  ``ImageFolder`` convention).

Batches come out *decoded* (PIL images or token lists) but not preprocessed;
the model adapter's ``collate`` turns them into tensors, because resizing and
normalisation belong to the model, not the data.

Bad data raises :class:`EvalDataError` (a ``ZooError``) naming the file, the
row and the cause: a corrupt or empty image, a label outside the head's class
count, missing columns.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from tswitch_ray.errors import ZooError
from tswitch_ray.io.fs import open_fs
from tswitch_ray.io.tables import write_table

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class EvalDataError(ZooError):
    """An evaluation data file is missing columns or holds a bad row."""


@dataclass
class RawBatch:
    """Decoded rows ``start .. start+len(items)-1`` of a dataset."""

    items: list[Any]
    labels: torch.Tensor | None
    start: int

    def __len__(self) -> int:
        return len(self.items)


class EvalDataset(Protocol):
    uri: str
    modality: str

    def __len__(self) -> int: ...

    def batches(self, batch_size: int = 256, *, num_classes: int | None = None, require_labels: bool = True, limit: int | None = None) -> Iterator[RawBatch]: ...


def _check_labels(uri: str, labels: np.ndarray, start: int, num_classes: int | None, row_name=None) -> None:
    if labels.size == 0:
        return
    bad = np.flatnonzero((labels < 0) | ((labels >= num_classes) if num_classes is not None else False))
    if bad.size:
        i = int(bad[0])
        where = row_name(i) if row_name else f"row {start + i}"
        limit = f"the head has {num_classes} classes (valid labels 0..{num_classes - 1})" if num_classes is not None else "labels must be >= 0"
        raise EvalDataError(f"{uri}: {where} has label {int(labels[i])}, outside the task's classes: {limit}. Check that the eval split matches the task head.")


def decode_image(data: bytes | None, uri: str, row: int | str) -> Image.Image:
    """Decode one encoded image fully (so truncation surfaces here, with its row)."""
    where = row if isinstance(row, str) else f"row {row}"
    if data is None or len(data) == 0:
        raise EvalDataError(f"{uri}: {where} has an empty image (null or zero bytes).")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise EvalDataError(f"{uri}: {where} holds a corrupt image that cannot be decoded ({type(e).__name__}: {e}).") from e
    return img


class ParquetEvalDataset:
    """A Parquet eval split streamed with ``iter_batches`` (see module doc for columns)."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        fs, self._path = open_fs(uri, self.storage_options)
        self._fs = fs
        try:
            with fs.open(self._path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except FileNotFoundError as e:
            raise EvalDataError(f"{uri}: eval dataset file not found.") from e
        except (pa.ArrowInvalid, OSError) as e:
            raise EvalDataError(f"{uri}: not a readable Parquet file ({e}).") from e
        self._num_rows = int(meta.num_rows)
        names = set(schema.names)
        if "image" in names:
            self.modality, self._data_col = "image", "image"
        elif "input_ids" in names:
            self.modality, self._data_col = "text", "input_ids"
        else:
            raise EvalDataError(f"{uri}: missing data column: an eval split needs 'image' (encoded image bytes) or 'input_ids' (list of ints); found columns {sorted(names)}.")
        self.has_labels = "label" in names
        self._columns = sorted(names)

    def __len__(self) -> int:
        return self._num_rows

    def batches(self, batch_size: int = 256, *, num_classes: int | None = None, require_labels: bool = True, limit: int | None = None) -> Iterator[RawBatch]:
        if require_labels and not self.has_labels:
            raise EvalDataError(f"{self.uri}: missing column 'label' (found columns {self._columns}); evaluation needs integer labels.")
        cols = [self._data_col] + (["label"] if self.has_labels else [])
        start = 0
        with self._fs.open(self._path, "rb") as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=cols):
                if limit is not None and start >= limit:
                    return
                n = rb.num_rows if limit is None else min(rb.num_rows, limit - start)
                labels = None
                if self.has_labels:
                    col = rb.column("label").slice(0, n)
                    if col.null_count:
                        i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                        raise EvalDataError(f"{self.uri}: row {start + i} has a null label.")
                    lab = col.to_numpy(zero_copy_only=False).astype(np.int64)
                    _check_labels(self.uri, lab, start, num_classes)
                    labels = torch.from_numpy(lab)
                data = rb.column(self._data_col).slice(0, n)
                if self.modality == "image":
                    if pa.types.is_struct(data.type):  # HF datasets' Image feature
                        data = data.field("bytes")
                    items = [decode_image(b, self.uri, start + i) for i, b in enumerate(data.to_pylist())]
                else:
                    items = data.to_pylist()
                    for i, ids in enumerate(items):
                        if ids is None:
                            raise EvalDataError(f"{self.uri}: row {start + i} has null input_ids.")
                yield RawBatch(items, labels, start)
                start += n


class ImageFolderDataset:
    """``root/<class>/*.png``; labels are sorted class-folder indices."""

    modality = "image"

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        self.uri = root
        self.storage_options = dict(storage_options or {})
        self._fs, path = open_fs(root, self.storage_options)
        path = path.rstrip("/")
        try:
            entries = self._fs.ls(path, detail=True)
        except FileNotFoundError as e:
            raise EvalDataError(f"{root}: image folder not found.") from e
        class_dirs = sorted((e["name"].rstrip("/") for e in entries if e["type"] == "directory"), key=lambda p: p.rsplit("/", 1)[-1])
        if not class_dirs:
            raise EvalDataError(f"{root}: no class sub-folders; an image folder dataset is laid out as root/<class_name>/<image>.png.")
        self.classes = [d.rsplit("/", 1)[-1] for d in class_dirs]
        self._files: list[tuple[str, int]] = []
        for label, d in enumerate(class_dirs):
            files = sorted(p for p in self._fs.ls(d, detail=False) if p.lower().endswith(tuple(extensions)))
            self._files.extend((p, label) for p in files)
        if not self._files:
            raise EvalDataError(f"{root}: the class folders hold no image files ({', '.join(extensions)}).")
        self.has_labels = True

    def __len__(self) -> int:
        return len(self._files)

    def batches(self, batch_size: int = 256, *, num_classes: int | None = None, require_labels: bool = True, limit: int | None = None) -> Iterator[RawBatch]:
        if num_classes is not None and len(self.classes) > num_classes:
            raise EvalDataError(
                f"{self.uri}: {len(self.classes)} class folders but the task head has {num_classes} classes; folder "
                f"{self.classes[num_classes]!r} would be label {num_classes}, outside the head. Check that the folder matches the task."
            )
        files = self._files if limit is None else self._files[:limit]
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            items = []
            for p, _ in chunk:
                with self._fs.open(p, "rb") as f:
                    items.append(decode_image(f.read(), self.uri, f"file {p}"))
            labels = torch.tensor([lab for _, lab in chunk], dtype=torch.long)
            yield RawBatch(items, labels, start)


def open_eval_dataset(uri: str, storage_options: Mapping[str, Any] | None = None) -> EvalDataset:
    """A Parquet file (``*.parquet``) or an image folder, by the URI's form."""
    if uri.rstrip("/").endswith(".parquet"):
        return ParquetEvalDataset(uri, storage_options)
    return ImageFolderDataset(uri, storage_options)


# ---------------------------------------------------------------- writing (demo zoo, tests)


def encode_png(img: np.ndarray) -> bytes:
    """uint8 ``[H, W, 3]`` (or ``[H, W]``) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return buf.getvalue()


def write_image_parquet(uri: str, images: Sequence[np.ndarray] | np.ndarray, labels: Sequence[int] | np.ndarray | None, storage_options: Mapping[str, Any] | None = None, row_group_size: int = 256) -> None:
    """Write images as PNG bytes (+ int64 labels) to a Parquet file on any fsspec URI."""
    cols: dict[str, pa.Array] = {"image": pa.array([encode_png(a) for a in images], type=pa.binary())}
    if labels is not None:
        cols["label"] = pa.array(np.asarray(labels, dtype=np.int64))
    _write_table(uri, pa.table(cols), storage_options, row_group_size)


def write_token_parquet(uri: str, input_ids: Sequence[Sequence[int]], labels: Sequence[int] | np.ndarray | None, storage_options: Mapping[str, Any] | None = None, row_group_size: int = 256) -> None:
    """Write token-id rows (``list<int32>``) + int64 labels to a Parquet file."""
    cols: dict[str, pa.Array] = {"input_ids": pa.array([list(map(int, r)) for r in input_ids], type=pa.list_(pa.int32()))}
    if labels is not None:
        cols["label"] = pa.array(np.asarray(labels, dtype=np.int64))
    _write_table(uri, pa.table(cols), storage_options, row_group_size)


def _write_table(uri: str, table: pa.Table, storage_options: Mapping[str, Any] | None, row_group_size: int) -> None:
    write_table(uri, table, dict(storage_options or {}), row_group_size=row_group_size)
