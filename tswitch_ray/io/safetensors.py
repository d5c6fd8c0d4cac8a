"""safetensors files over fsspec: the header parser, lazy readers and atomic writers.

* :func:`parse_header` - THE safetensors header parser (8-byte little-endian
  length + JSON), validated against the file size; every reader uses it.
* :class:`SafetensorsReader` (one file, byte-range reads) and
  :class:`ShardedSafetensorsReader` (an HF folder); :func:`read_safetensors`
  reads a small file whole.
* :func:`save_safetensors` - a whole state dict to one file, atomically.
* :func:`save_sharded` - an HF-style sharded folder with an index.
* :class:`SafetensorsStreamWriter` - one file written tensor by tensor, for
  outputs too large to hold at once (the synthetic zoo generator, merged or
  reconstructed models): the header is computed up front from the tensors'
  names, shapes and dtypes and each tensor is written as it arrives.
* :func:`all_or_none` - several stream writers finished together, or all aborted.
* :func:`concat_safetensors` - parts (one per shard) into one file.

Readers never see a half-written file: local files are written under a
temporary name in the same folder and renamed; object stores get a single
PUT (or one multipart upload that only becomes visible when completed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import posixpath
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save as _st_save

from tswitch_ray.errors import ZooError
from tswitch_ray.io.atomic import FileDigest, atomic_write, read_bytes
from tswitch_ray.io.checkpoints import (
    CheckpointReader,
    LazyFs,
    TensorInfo,
    bytes_to_tensor,
    dtype_itemsize,
    dtype_name,
    is_known_dtype,
    known_dtypes,
)
from tswitch_ray.io.faults import storage_errors
from tswitch_ray.io.fs import access_checked, access_denied, fs_is_local, join_uri, open_fs

# safetensors itself refuses headers above 100 MB; anything larger is garbage.
_MAX_HEADER_BYTES = 100_000_000
# One ranged read at open time usually covers the whole header (a ViT-L/14
# header is ~40 KB), so opening a checkpoint costs a single request.
_FIRST_READ_BYTES = 256 * 1024

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# --- the header ---------------------------------------------------------------

@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header: tensors ordered by offset, their absolute byte spans, and ``__metadata__``."""

    infos: dict[str, TensorInfo]
    spans: dict[str, tuple[int, int]]  # absolute byte [start, end) in the file
    metadata: dict[str, str]


def parse_header(first: bytes, size: int, uri: str, fetch: Callable[[int, int], bytes]) -> SafetensorsHeader:
    """Parse and validate the header of the safetensors file ``uri`` of ``size`` bytes.

    ``first`` is the file's first bytes (at least 8; usually the whole header),
    ``fetch(start, end)`` reads the rest of the header when ``first`` is
    short. Every tensor's byte span must match shape x dtype and lie inside
    the file; a ``ZooError`` names the file (and tensor) and the cause.
    """
    if size < 8:
        raise ZooError(
            f"checkpoint file {uri} is {size} bytes long, too short to be a safetensors file "
            "(it needs an 8-byte header length); the file is truncated or not safetensors."
        )
    n = int.from_bytes(first[:8], "little")
    if n > size - 8 or n > _MAX_HEADER_BYTES or n < 2:
        raise ZooError(
            f"checkpoint file {uri} declares a {n}-byte safetensors header but the file is {size} bytes; "
            "the file is not a safetensors file or is truncated."
        )
    raw = first[8 : 8 + n]
    if len(raw) < n:
        raw = raw + fetch(len(first), 8 + n)
    try:
        parsed = json.loads(bytes(raw).decode("utf-8"), object_pairs_hook=_Pairs)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZooError(
            f"checkpoint file {uri} has a safetensors header that is not valid JSON ({e}); "
            "the file is corrupt or not a safetensors file."
        ) from None
    header = _header_object(uri, parsed)
    if not isinstance(header, dict):
        raise ZooError(f"checkpoint file {uri} has a safetensors header that is not a JSON object.")
    meta = header.pop("__metadata__", None) or {}
    metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    data_start = 8 + n
    entries = sorted((_parse_entry(uri, name, entry, data_start, size) for name, entry in header.items()),
                     key=lambda e: (e[0], e[1]))
    _refuse_overlaps(uri, entries)
    return SafetensorsHeader({info.name: info for _, _, info in entries},
                             {info.name: (s, e) for s, e, info in entries}, metadata)


class _Pairs(list):
    """A JSON object as its (key, value) pairs in file order: ``json`` would keep the last of two equal keys."""


def _header_object(uri: str, parsed: Any) -> Any:
    """The parsed header with its objects as dicts; a tensor name (top-level key) or an entry's field given
    twice is refused, since such a header has no single right reading."""

    def plain(value: Any, where: str) -> Any:
        if isinstance(value, _Pairs):
            out: dict[str, Any] = {}
            for key, item in value:
                if key in out:
                    raise ZooError(f"checkpoint file {uri}: {where} gives the field {key!r} twice; the header is corrupt.")
                out[key] = plain(item, where)
            return out
        return [plain(v, where) for v in value] if isinstance(value, list) else value

    if not isinstance(parsed, _Pairs):
        return parsed
    header: dict[str, Any] = {}
    for name, entry in parsed:
        if name in header:
            raise ZooError(
                f"checkpoint file {uri} has a safetensors header with a duplicate tensor name {name!r}; "
                "the file is corrupt or was written by a broken tool."
            )
        header[name] = plain(entry, f"the header entry of tensor {name!r}")
    return header


def _refuse_overlaps(uri: str, entries: Sequence[tuple[int, int, TensorInfo]]) -> None:
    """``entries`` sorted by span: refuse two tensors whose bytes overlap (each must own its bytes)."""
    reach, owner = 0, None  # the furthest end so far among non-empty tensors, and whose it is
    for start, end, info in entries:
        if end == start:
            continue  # an empty tensor owns no bytes
        if owner is not None and start < reach:
            prev, prev_end = owner, reach
            raise ZooError(
                f"checkpoint file {uri}: tensors {prev.name!r} and {info.name!r} have overlapping data offsets "
                f"(bytes {start}..{min(end, prev_end)} belong to both); the header is corrupt."
            )
        if end > reach:
            reach, owner = end, info


def _parse_entry(uri: str, name: str, entry: Any, data_start: int, size: int) -> tuple[int, int, TensorInfo]:
    where = f"checkpoint file {uri}, tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ZooError(f"{where}: header entry must have dtype, shape and data_offsets; got {entry!r}.")
    dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or not is_known_dtype(dtype):
        raise ZooError(f"{where}: unsupported dtype {dtype!r} (supported: {', '.join(known_dtypes())}).")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ZooError(f"{where}: shape must be a list of non-negative integers, got {shape!r}.")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(isinstance(o, int) for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise ZooError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offs!r}.")
    shape_t = tuple(shape)
    need = math.prod(shape_t) * dtype_itemsize(dtype)
    if offs[1] - offs[0] != need:
        raise ZooError(
            f"{where}: data_offsets {offs} span {offs[1] - offs[0]} bytes but shape {list(shape_t)} "
            f"of {dtype} needs {need} bytes; the header is inconsistent (corrupt file)."
        )
    start, end = data_start + offs[0], data_start + offs[1]
    if end > size:
        raise ZooError(
            f"{where}: the tensor's data ends at byte {end} but the file has only {size} bytes; "
            "the file is truncated (an interrupted copy or download?)."
        )
    return start, end, TensorInfo(name, shape_t, dtype, need)


# --- readers ------------------------------------------------------------------

def _read_local(path: str, offset: int, size: int) -> bytearray:
    """``size`` bytes at ``offset`` of a local file, read straight into writable memory.

    fsspec's ``cat_file`` returns immutable bytes, which a tensor must copy
    once more before it may own them; ``readinto`` skips that copy (the
    whole zoo passes through here twice per build).
    """
    buf = bytearray(size)
    with open(path, "rb") as f:
        f.seek(offset)
        got = f.readinto(buf)
    return buf if got == size else buf[:got]


class SafetensorsReader(LazyFs):
    """A single ``.safetensors`` file on any fsspec filesystem.

    The header is fetched with one ranged read and validated by
    :func:`parse_header`. ``read`` then fetches exactly one tensor's bytes.
    """

    _transient = ("_fs",)

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self._storage_options = storage_options
        self._fs = None
        self._path = ""
        self._infos: dict[str, TensorInfo] | None = None
        self._spans: dict[str, tuple[int, int]] = {}  # absolute byte [start, end)
        self._metadata: dict[str, str] = {}

    # -- header ---------------------------------------------------------
    def _load_header(self) -> None:
        if self._infos is not None:
            return
        with access_checked("checkpoint file", self.uri):
            self._read_header()

    def _read_header(self) -> None:
        fs, path = self._fs_path()
        try:
            size = fs.size(path)
        except FileNotFoundError:
            raise ZooError(f"checkpoint file {self.uri} does not exist (or is not readable).") from None
        if size is None:
            size = fs.info(path).get("size")
        # start/end by keyword: s3fs's second positional parameter is version_id.
        first = fs.cat_file(path, start=0, end=min(size, _FIRST_READ_BYTES)) if size >= 8 else b""
        header = parse_header(first, size, self.uri, lambda s, e: fs.cat_file(path, start=s, end=e))
        self._infos, self._spans, self._metadata = header.infos, header.spans, header.metadata

    # -- public API -----------------------------------------------------
    def infos(self) -> dict[str, TensorInfo]:
        self._load_header()
        assert self._infos is not None
        return dict(self._infos)

    def metadata(self) -> dict[str, str]:
        """The header's ``__metadata__`` (string to string)."""
        self._load_header()
        return dict(self._metadata)

    def _info(self, name: str) -> TensorInfo:
        self._load_header()
        assert self._infos is not None
        try:
            return self._infos[name]
        except KeyError:
            raise ZooError(f"checkpoint file {self.uri} has no tensor {name!r}.") from None

    def read(self, name: str) -> torch.Tensor:
        info = self._info(name)
        data = self.read_range(name, 0, info.nbytes)
        return bytes_to_tensor(data, info)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of one tensor's data (offsets inside the tensor)."""
        info = self._info(name)
        end = min(end, info.nbytes)
        if end <= start:
            return b""
        fs, path = self._fs_path()
        base = self._spans[name][0]
        try:
            with access_checked("checkpoint file", self.uri):
                if fs_is_local(fs):
                    data = _read_local(path, base + start, end - start)
                else:
                    data = fs.cat_file(path, start=base + start, end=base + end)
        except FileNotFoundError:
            raise ZooError(f"checkpoint file {self.uri} disappeared while reading tensor {name!r}.") from None
        if len(data) != end - start:
            raise ZooError(
                f"checkpoint file {self.uri}, tensor {name!r}: expected {end - start} bytes at offset "
                f"{base + start} but got {len(data)}; the file is truncated or changed while being read."
            )
        return data

    def read_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes]:
        """Several tensor byte ranges at once (concurrent requests on object stores)."""
        fs, path = self._fs_path()
        starts, ends, clipped = [], [], []
        for name, s, e in requests:
            info = self._info(name)
            e = min(e, info.nbytes)
            s = min(s, e)
            base = self._spans[name][0]
            starts.append(base + s)
            ends.append(base + e)
            clipped.append(e - s)
        if fs_is_local(fs) or len(requests) <= 1:
            return [self.read_range(n, s, e) for n, s, e in requests]
        # Empty ranges (zero-element tensors) are not sent: an object store
        # answers a zero-length range with an error, not with zero bytes.
        wanted = [i for i, want in enumerate(clipped) if want]
        out: list[bytes] = [b""] * len(requests)
        got = fs.cat_ranges([path] * len(wanted), [starts[i] for i in wanted], [ends[i] for i in wanted])
        for i, data in zip(wanted, got):
            if isinstance(data, PermissionError):
                raise access_denied("checkpoint file", self.uri, data)
            if isinstance(data, FileNotFoundError):
                raise ZooError(f"checkpoint file {self.uri} disappeared while reading tensor {requests[i][0]!r}.")
            if isinstance(data, Exception) or len(data) != clipped[i]:
                raise ZooError(
                    f"checkpoint file {self.uri}, tensor {requests[i][0]!r}: a ranged read failed or came back "
                    "short; the file is truncated or changed while being read."
                )
            out[i] = data
        return out


class ShardedSafetensorsReader(LazyFs):
    """An HF-style checkpoint folder.

    Either ``model.safetensors.index.json`` (``{"weight_map": {tensor: file}}``)
    with its shard files, or a single ``model.safetensors``. Tensors are ordered
    by shard file name, then by offset inside the shard.
    """

    _transient = ("_fs",)

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri.rstrip("/")
        self._storage_options = storage_options
        self._fs = None
        self._path = ""
        self._shards: dict[str, SafetensorsReader] | None = None
        self._where: dict[str, str] = {}  # tensor -> shard file name
        self._infos: dict[str, TensorInfo] | None = None

    def _load(self) -> None:
        if self._infos is not None:
            return
        with access_checked("checkpoint folder", self.uri):
            self._read_index()

    def _weight_map(self) -> tuple[dict[str, str] | None, list[str]]:
        """The index's {tensor: shard file} (None for a single ``model.safetensors``) and the shard files."""
        fs, path = self._fs_path()
        index_path = posixpath.join(path, INDEX_FILE)
        if fs.exists(index_path):
            try:
                index = json.loads(fs.cat_file(index_path).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ZooError(f"checkpoint index {join_uri(self.uri, INDEX_FILE)} is not valid JSON ({e}).") from None
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
                raise ZooError(
                    f"checkpoint index {join_uri(self.uri, INDEX_FILE)} has no usable \"weight_map\" "
                    "(expected a non-empty {tensor name: shard file name} object)."
                )
            return dict(wm), sorted(set(wm.values()))
        if fs.exists(posixpath.join(path, SINGLE_FILE)):
            return None, [SINGLE_FILE]
        raise ZooError(
            f"checkpoint folder {self.uri} has neither {INDEX_FILE} nor {SINGLE_FILE} "
            "(or does not exist)."
        )

    def _read_index(self) -> None:
        weight_map, files = self._weight_map()
        shards = {f: SafetensorsReader(join_uri(self.uri, f), self._storage_options) for f in files}
        infos: dict[str, TensorInfo] = {}
        where: dict[str, str] = {}
        for f, reader in shards.items():
            shard_infos = reader.infos()
            if weight_map is not None:
                for name in (n for n, ff in weight_map.items() if ff == f):
                    if name not in shard_infos:
                        raise ZooError(
                            f"checkpoint index {join_uri(self.uri, INDEX_FILE)} maps tensor {name!r} to shard "
                            f"{reader.uri}, which has no such tensor; the folder is incomplete or mixed up."
                        )
            for name, info in shard_infos.items():
                if weight_map is not None and weight_map.get(name) != f:
                    continue  # the index is authoritative; stray copies are ignored
                infos[name] = info
                where[name] = f
        self._shards, self._where, self._infos = shards, where, infos

    def infos(self) -> dict[str, TensorInfo]:
        self._load()
        assert self._infos is not None
        return dict(self._infos)

    def _shard(self, name: str) -> SafetensorsReader:
        self._load()
        assert self._shards is not None
        if name not in self._where:
            raise ZooError(f"checkpoint folder {self.uri} has no tensor {name!r}.")
        return self._shards[self._where[name]]

    def read(self, name: str) -> torch.Tensor:
        return self._shard(name).read(name)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        return self._shard(name).read_range(name, start, end)

    def read_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes]:
        return [self.read_range(n, s, e) for n, s, e in requests]


def read_safetensors(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the ``__metadata__`` of one (small) safetensors file on any fsspec URI, read whole."""
    from safetensors.torch import load

    raw = read_bytes(uri, storage_options)
    header = parse_header(raw[:_FIRST_READ_BYTES], len(raw), uri, lambda s, e: raw[s:e])
    try:
        return load(raw), header.metadata
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file for the user
        raise ZooError(f"{uri}: not a valid safetensors file ({type(e).__name__}: {e}).") from e


# --- writers ------------------------------------------------------------------

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


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """``tensors`` serialised as one safetensors file, in memory."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()} or None
    return _st_save(_prepare(tensors), metadata=meta)


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
    atomic_write(uri, safetensors_bytes(tensors, metadata), storage_options)
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
    atomic_write(join_uri(uri, INDEX_FILE), json.dumps(index, indent=2).encode(), storage_options)
    return uri


def _layout_infos(uri: str, layout: Iterable[TensorInfo | tuple[str, tuple[int, ...], str]]) -> list[TensorInfo]:
    infos: list[TensorInfo] = []
    for item in layout:
        if isinstance(item, TensorInfo):
            infos.append(item)
        else:
            name, shape, dtype = item
            shape = tuple(int(d) for d in shape)
            infos.append(TensorInfo(name, shape, dtype, math.prod(shape) * dtype_itemsize(dtype)))
    names = [i.name for i in infos]
    if len(set(names)) != len(names):
        raise ZooError(f"cannot write {uri}: duplicate tensor names in the layout.")
    return infos


def _header_bytes(layout: Sequence[TensorInfo], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and the JSON header of a file holding ``layout`` in order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for info in layout:
        header[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [off, off + info.nbytes]}
        off += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    return len(raw).to_bytes(8, "little") + raw




class SafetensorsStreamWriter:
    """Write one safetensors file tensor by tensor, in a fixed order.

    ``layout`` gives every tensor's (name, shape, dtype) in the order they
    will be written; the header is computed from it and written first. Call
    :meth:`write` once per tensor in that order, then :meth:`close`, or use it
    as a context manager (an exception aborts and leaves no file behind).
    Only the current tensor is ever held in memory. With ``hashed``,
    :meth:`digest` gives the finished file's sha256 and size, hashed as it
    was written (off by default: hashing costs about a second per GB).
    """

    def __init__(
        self,
        uri: str,
        layout: Iterable[TensorInfo | tuple[str, tuple[int, ...], str]],
        storage_options: dict[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
        hashed: bool = False,
    ) -> None:
        self.uri = uri
        self._layout = _layout_infos(uri, layout)
        head = _header_bytes(self._layout, metadata)
        self._next = 0
        self._block_done = 0  # elements of the current tensor written by write_block
        self._sha = hashlib.sha256() if hashed else None
        self._size = 0
        self._fs, self._path = open_fs(uri, storage_options)
        self._local = fs_is_local(self._fs)
        with self._faults():
            self._open()
        self._closed = False
        try:
            self._emit(head)
        except BaseException:
            self.abort()
            raise

    def _faults(self) -> contextlib.AbstractContextManager[None]:
        """A full disk or a denied destination: a StorageError naming the file (io/faults.py)."""
        return storage_errors("cannot write", self.uri, self._fs.storage_options, missing=True)

    def _open(self) -> None:
        if self._local:
            parent = os.path.dirname(self._path) or "."
            os.makedirs(parent, exist_ok=True)
            self._tmp = os.path.join(parent, f".{os.path.basename(self._path)}.tmp-{uuid.uuid4().hex[:8]}")
            self._f = open(self._tmp, "wb")
        else:
            self._fs.makedirs(posixpath.dirname(self._path), exist_ok=True)
            self._f = self._fs.open(self._path, "wb")

    def _emit(self, data: bytes) -> None:
        with self._faults():
            self._f.write(data)
        if self._sha is not None:
            self._sha.update(data)
        self._size += len(data)

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
            self._emit(memoryview(t.view(torch.uint8).numpy()))  # no copy: written straight from the tensor
        self._next += 1

    def write_block(self, name: str, block: torch.Tensor) -> None:
        """Write the next flat block of the current tensor ``name`` (its elements in order); the tensor is
        done when its blocks hold all its elements. For tensors made in row blocks (a chunked merge)."""
        if self._next >= len(self._layout) or self._layout[self._next].name != name:
            raise ZooError(f"cannot write a block of tensor {name!r} to {self.uri}: it is not the next tensor.")
        info = self._layout[self._next]
        t = block.detach().cpu().contiguous().reshape(-1)
        done = self._block_done + t.numel()
        if dtype_name(t.dtype) != info.dtype or done > info.numel:
            raise ZooError(f"cannot write a block of tensor {name!r} to {self.uri}: {t.numel()} "
                           f"{dtype_name(t.dtype)} elements do not fit its {list(info.shape)} {info.dtype}.")
        if t.numel():
            self._emit(memoryview(t.view(torch.uint8).numpy()))
        self._block_done = done
        if done == info.numel:
            self._block_done = 0
            self._next += 1

    def close(self) -> str:
        """Finish the file (it becomes visible now); returns its URI."""
        if self._closed:
            return self.uri
        if self._next != len(self._layout):
            missing = self._layout[self._next].name
            self.abort()
            raise ZooError(f"cannot finish {self.uri}: tensor {missing!r} and later ones were never written.")
        try:
            with self._faults():
                self._finish()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.uri

    def _finish(self) -> None:
        if self._local:  # as atomic_write: the data is on disk before the name points at it
            self._f.flush()
            os.fsync(self._f.fileno())
        self._f.close()
        if self._local:
            os.replace(self._tmp, self._path)

    def digest(self) -> FileDigest:
        """sha256 and size of the bytes written so far (the whole file once closed)."""
        if self._sha is None:
            raise ValueError(f"{self.uri}: the writer was opened without hashed=True; it has no digest.")
        return FileDigest(self.uri, self._sha.hexdigest(), self._size)

    def abort(self) -> None:
        """Drop the partial file; nothing becomes visible."""
        if self._closed:
            return
        self._closed = True
        if self._local:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
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


def concat_safetensors(parts: Sequence[str], uri: str, order: Sequence[str] | None = None,
                       metadata: dict[str, str] | None = None,
                       storage_options: dict[str, Any] | None = None) -> FileDigest:
    """Write every tensor of ``parts`` to ``uri`` in ``order`` (default: parts' order), one tensor in memory at a time.

    Returns the written file's digest. Every part is a safetensors file (a staged merge part).
    """
    owner: dict[str, CheckpointReader] = {}
    for part in parts:
        reader = SafetensorsReader(part, storage_options)
        for name in reader.infos():
            owner[name] = reader
    names = list(order) if order is not None else list(owner)
    layout = [owner[n].infos()[n] for n in names]
    with SafetensorsStreamWriter(uri, layout, storage_options=storage_options, metadata=metadata,
                                 hashed=True) as writer:
        for name in names:
            writer.write(name, owner[name].read(name))
    return writer.digest()
