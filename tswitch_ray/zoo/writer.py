"""Writing safetensors checkpoints through fsspec, atomically.

Readers never see a half-written file: local files are written under a
temporary name in the same folder and renamed; object stores get a single
PUT (or one multipart upload that only becomes visible when completed).

* :func:`save_safetensors` - a whole state dict to one file.
* :func:`save_sharded` - an HF-style sharded folder with an index.
* :class:`SafetensorsStreamWriter` - one file written tensor by tensor, for
  outputs too large to hold at once (the synthetic zoo generator, merged or
  reconstructed models): the header is computed up front from the tensors'
  names, shapes and dtypes and each tensor is written as it arrives.
* :func:`all_or_none` - several stream writers finished together, or all
  aborted.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from safetensors.torch import save as _st_save

from tswitch_ray.errors import ZooError
from tswitch_ray.zoo._fs import fs_is_local, get_fs, join_uri
from tswitch_ray.zoo.readers import INDEX_FILE, SINGLE_FILE, TensorInfo, dtype_itemsize, dtype_name


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that own their storage.

    Tied/shared tensors (and views into larger storages) are cloned so every
    name gets its own bytes: safetensors refuses shared storage, and the zoo
    readers must find every tensor name the model has.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ZooError(f"cannot save {name!r}: it is a {type(t).__name__}, not a tensor.")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        ptr = t.untyped_storage().data_ptr()
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
        if not whole or (ptr != 0 and ptr in seen):
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr()
        if ptr != 0:
            seen.add(ptr)
        out[str(name)] = t
    return out


def _atomic_write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None) -> None:
    fs, path = get_fs(uri, storage_options)
    if fs_is_local(fs):
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data)  # a single PUT: visible all at once or not at all


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    uri: str,
    storage_options: dict[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``tensors`` to one safetensors file at ``uri`` atomically; returns ``uri``.

    The file is serialised in memory first (fine for single models of a few
    hundred MB; use :class:`SafetensorsStreamWriter` for more).
    """
    meta = {str(k): str(v) for k, v in (metadata or {}).items()} or None
    data = _st_save(_prepare(tensors), metadata=meta)
    _atomic_write_bytes(uri, data, storage_options)
    return uri


def save_sharded(
    tensors: Mapping[str, torch.Tensor],
    uri: str,
    max_shard_bytes: int = 2 * 1024**3,
    storage_options: dict[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write an HF-style checkpoint folder at ``uri``; returns ``uri``.

    Tensors are packed in order into shards of at most ``max_shard_bytes``
    (a single tensor larger than that gets a shard of its own). One shard is
    written as ``model.safetensors``; several as
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``,
    which is written last so a reader never sees an index pointing at
    missing shards.
    """
    if max_shard_bytes <= 0:
        raise ZooError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    prepared = _prepare(tensors)
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in prepared.items():
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += t.nbytes
    uri = uri.rstrip("/")
    if len(groups) == 1:
        save_safetensors(groups[0], join_uri(uri, SINGLE_FILE), storage_options, metadata)
        return uri
    n = len(groups)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_safetensors(group, join_uri(uri, fname), storage_options, metadata)
        weight_map.update({name: fname for name in group})
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in prepared.values()), **dict(metadata or {})},
        "weight_map": weight_map,
    }
    _atomic_write_bytes(join_uri(uri, INDEX_FILE), json.dumps(index, indent=2).encode(), storage_options)
    return uri


class SafetensorsStreamWriter:
    """Write one safetensors file tensor by tensor, in a fixed order.

    ``layout`` gives every tensor's (name, shape, dtype) in the order they
    will be written; the header is computed from it and written first. Call
    :meth:`write` once per tensor in that order, then :meth:`close`, or use it
    as a context manager (an exception aborts and leaves no file behind).
    Only the current tensor is ever held in memory.
    """

    def __init__(
        self,
        uri: str,
        layout: Iterable[TensorInfo | tuple[str, tuple[int, ...], str]],
        storage_options: dict[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.uri = uri
        self._layout: list[TensorInfo] = []
        for item in layout:
            if isinstance(item, TensorInfo):
                info = item
            else:
                name, shape, dtype = item
                shape = tuple(int(d) for d in shape)
                n = 1
                for d in shape:
                    n *= d
                info = TensorInfo(name, shape, dtype, n * dtype_itemsize(dtype))
            self._layout.append(info)
        names = [i.name for i in self._layout]
        if len(set(names)) != len(names):
            raise ZooError(f"cannot write {uri}: duplicate tensor names in the layout.")
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        off = 0
        for info in self._layout:
            header[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [off, off + info.nbytes]}
            off += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self._next = 0
        self._fs, self._path = get_fs(uri, storage_options)
        self._local = fs_is_local(self._fs)
        if self._local:
            parent = os.path.dirname(self._path) or "."
            os.makedirs(parent, exist_ok=True)
            self._tmp = os.path.join(parent, f".{os.path.basename(self._path)}.tmp-{uuid.uuid4().hex[:8]}")
            self._f = open(self._tmp, "wb")
        else:
            self._fs.makedirs(posixpath.dirname(self._path), exist_ok=True)
            self._f = self._fs.open(self._path, "wb")
        self._f.write(len(raw).to_bytes(8, "little"))
        self._f.write(raw)
        self._closed = False

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._layout):
            raise ZooError(f"cannot write tensor {name!r} to {self.uri}: all tensors of the layout are written.")
        info = self._layout[self._next]
        if name != info.name:
            raise ZooError(f"cannot write tensor {name!r} to {self.uri}: expected {info.name!r} next.")
        t = tensor.detach()
        if tuple(t.shape) != info.shape or dtype_name(t.dtype) != info.dtype:
            raise ZooError(
                f"cannot write tensor {name!r} to {self.uri}: got shape {list(t.shape)} {dtype_name(t.dtype)}, "
                f"the layout says {list(info.shape)} {info.dtype}."
            )
        t = t.cpu().contiguous().reshape(-1)
        if t.numel():
            self._f.write(t.view(torch.uint8).numpy().tobytes())
        self._next += 1

    def close(self) -> str:
        """Finish the file (it becomes visible now); returns its URI."""
        if self._closed:
            return self.uri
        if self._next != len(self._layout):
            missing = self._layout[self._next].name
            self.abort()
            raise ZooError(f"cannot finish {self.uri}: tensor {missing!r} and later ones were never written.")
        self._f.close()
        if self._local:
            os.replace(self._tmp, self._path)
        self._closed = True
        return self.uri

    def abort(self) -> None:
        """Drop the partial file; nothing becomes visible."""
        if self._closed:
            return
        self._closed = True
        if self._local:
            self._f.close()
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
        elif hasattr(self._f, "discard"):
            self._f.discard()  # cancels an s3 multipart upload
        else:
            try:
                self._fs.rm(self._path)
            except (FileNotFoundError, OSError):
                pass

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@contextlib.contextmanager
def all_or_none(make_writers: Iterable[SafetensorsStreamWriter]) -> Iterator[list[SafetensorsStreamWriter]]:
    """Open the writers (lazily, so one that fails to open aborts those before it),
    yield them, close them all on success and abort them all on any error."""
    writers: list[SafetensorsStreamWriter] = []
    try:
        for writer in make_writers:
            writers.append(writer)
        yield writers
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
