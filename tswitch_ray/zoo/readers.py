"""Lazy, per-tensor checkpoint readers over fsspec.

A reader knows a checkpoint's tensor names, shapes and dtypes from its header
alone (``infos()``) and reads one tensor at a time (``read(name)``), so a
pipeline can stream N checkpoints tensor by tensor without ever holding a whole
model. For safetensors files a ``read`` fetches exactly that tensor's byte
range (one ranged GET on s3://); the file is never loaded whole.

Readers are cheap to create (nothing is read until first use) and picklable
(the fsspec handle and caches are dropped and rebuilt), so they can be shipped
to Ray workers.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import posixpath
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from tswitch_ray.errors import ZooError
from tswitch_ray.zoo._fs import access_checked, access_denied, fs_is_local, get_fs, join_uri

# safetensors dtype name -> (torch dtype, bytes per element)
_ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
# Newer dtypes only where this torch build has them.
for _name, _attr, _size in (
    ("U16", "uint16", 2),
    ("U32", "uint32", 4),
    ("U64", "uint64", 8),
    ("F8_E4M3", "float8_e4m3fn", 1),
    ("F8_E5M2", "float8_e5m2", 1),
):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = (getattr(torch, _attr), _size)

_TORCH_TO_ST: dict[torch.dtype, str] = {td: name for name, (td, _) in _ST_DTYPES.items()}

# safetensors itself refuses headers above 100 MB; anything larger is garbage.
_MAX_HEADER_BYTES = 100_000_000
# One ranged read at open time usually covers the whole header (a ViT-L/14
# header is ~40 KB), so opening a checkpoint costs a single request.
_FIRST_READ_BYTES = 256 * 1024

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TORCH_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt")


def dtype_to_torch(dtype: str) -> torch.dtype:
    """torch dtype for a safetensors dtype name ("F32", "F16", "BF16", ...)."""
    try:
        return _ST_DTYPES[dtype][0]
    except KeyError:
        raise ZooError(f"unsupported tensor dtype {dtype!r}; supported: {', '.join(_ST_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors dtype name for a torch dtype."""
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise ZooError(f"unsupported tensor dtype {dtype}; supported: {', '.join(_ST_DTYPES)}") from None


def dtype_itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    dtype_to_torch(dtype)
    return _ST_DTYPES[dtype][1]


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one stored tensor, known from headers alone."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: "F32", "F16", "BF16", ...
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@runtime_checkable
class CheckpointReader(Protocol):
    """One checkpoint, read lazily tensor by tensor."""

    uri: str

    def infos(self) -> dict[str, TensorInfo]:
        """Every tensor's info, ordered as stored, from headers alone."""
        ...

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, owning its memory (safe to modify)."""
        ...


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


def _bytes_to_tensor(data: bytes | bytearray, info: TensorInfo) -> torch.Tensor:
    tdtype = dtype_to_torch(info.dtype)
    if info.numel == 0:
        return torch.empty(info.shape, dtype=tdtype)
    # bytearray: the tensor must own writable memory, not alias fsspec's bytes.
    buf = data if isinstance(data, bytearray) else bytearray(data)
    t = torch.frombuffer(buf, dtype=tdtype)
    if sys.byteorder != "little":  # safetensors is little-endian on disk
        t = t.view(torch.uint8).view(-1, dtype_itemsize(info.dtype)).flip(-1).contiguous().view(tdtype).flatten()
    return t.reshape(info.shape)


class _LazyFs:
    """Mixin: an fsspec handle created on first use and dropped on pickling."""

    uri: str
    _storage_options: dict[str, Any] | None

    def _fs_path(self):
        if getattr(self, "_fs", None) is None:
            self._fs, self._path = get_fs(self.uri, self._storage_options)
        return self._fs, self._path

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for k in self._transient:
            state[k] = None
        return state

    _transient: tuple[str, ...] = ("_fs",)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class SafetensorsReader(_LazyFs):
    """A single ``.safetensors`` file on any fsspec filesystem.

    The header (8-byte little-endian length + JSON) is fetched with one ranged
    read and validated against the file size: every tensor's byte span must
    match shape x dtype and lie inside the file. ``read`` then fetches exactly
    one tensor's bytes.
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
        if size < 8:
            raise ZooError(
                f"checkpoint file {self.uri} is {size} bytes long, too short to be a safetensors file "
                "(it needs an 8-byte header length); the file is truncated or not safetensors."
            )
        # start/end by keyword: s3fs's second positional parameter is version_id.
        first = fs.cat_file(path, start=0, end=min(size, _FIRST_READ_BYTES))
        n = int.from_bytes(first[:8], "little")
        if n > size - 8 or n > _MAX_HEADER_BYTES or n < 2:
            raise ZooError(
                f"checkpoint file {self.uri} declares a {n}-byte safetensors header but the file is {size} bytes; "
                "the file is not a safetensors file or is truncated."
            )
        raw = first[8 : 8 + n]
        if len(raw) < n:
            raw = raw + fs.cat_file(path, start=len(first), end=8 + n)
        try:
            header = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ZooError(
                f"checkpoint file {self.uri} has a safetensors header that is not valid JSON ({e}); "
                "the file is corrupt or not a safetensors file."
            ) from None
        if not isinstance(header, dict):
            raise ZooError(f"checkpoint file {self.uri} has a safetensors header that is not a JSON object.")
        meta = header.pop("__metadata__", None) or {}
        self._metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
        data_start = 8 + n
        entries: list[tuple[int, int, TensorInfo]] = []
        for name, entry in header.items():
            entries.append(self._parse_entry(name, entry, data_start, size))
        entries.sort(key=lambda e: (e[0], e[1]))
        self._infos = {info.name: info for _, _, info in entries}
        self._spans = {info.name: (s, e) for s, e, info in entries}

    def _parse_entry(self, name: str, entry: Any, data_start: int, size: int) -> tuple[int, int, TensorInfo]:
        where = f"checkpoint file {self.uri}, tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ZooError(f"{where}: header entry must have dtype, shape and data_offsets; got {entry!r}.")
        dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise ZooError(f"{where}: unsupported dtype {dtype!r} (supported: {', '.join(_ST_DTYPES)}).")
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
        need = math.prod(shape_t) * _ST_DTYPES[dtype][1]
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
        data = self._read_raw(name, 0, info.nbytes)
        return _bytes_to_tensor(data, info)

    def _read_raw(self, name: str, start: int, end: int) -> bytes:
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

    def _read_raw_many(self, requests: list[tuple[str, int, int]]) -> list[bytes]:
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
            return [self._read_raw(n, s, e) for n, s, e in requests]
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


class ShardedSafetensorsReader(_LazyFs):
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

    def _read_index(self) -> None:
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
            weight_map: dict[str, str] | None = dict(wm)
            files = sorted(set(wm.values()))
        elif fs.exists(posixpath.join(path, SINGLE_FILE)):
            weight_map = None
            files = [SINGLE_FILE]
        else:
            raise ZooError(
                f"checkpoint folder {self.uri} has neither {INDEX_FILE} nor {SINGLE_FILE} "
                "(or does not exist)."
            )
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

    def _read_raw(self, name: str, start: int, end: int) -> bytes:
        return self._shard(name)._read_raw(name, start, end)


class TorchStateDictReader(_LazyFs):
    """A ``.pt``/``.pth``/``.bin`` state dict, loaded only with ``weights_only=True``.

    Local files are memory-mapped (``mmap=True``) so only the tensors actually
    read are paged in; remote files are first downloaded to a temporary file.
    A file that needs arbitrary classes to unpickle (e.g. a whole pickled
    module, as in the task_vectors repository) is refused: converting it once
    with ``tswitch zoo convert --trust-pickle`` is an explicit, audited step.
    A nested ``{"state_dict": {...}}`` is unwrapped; non-tensor entries are
    ignored.
    """

    _transient = ("_fs", "_sd")

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self._storage_options = storage_options
        self._fs = None
        self._path = ""
        self._sd: dict[str, torch.Tensor] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        if self._sd is not None:
            return self._sd
        fs, path = self._fs_path()
        with access_checked("checkpoint file", self.uri):
            exists = fs.exists(path)
        if not exists:
            raise ZooError(f"checkpoint file {self.uri} does not exist (or is not readable).")
        if fs_is_local(fs):
            obj = _torch_load_safe(path, self.uri)
        else:
            fd, tmp = tempfile.mkstemp(suffix=posixpath.splitext(path)[1] or ".pt", prefix="tswitch-")
            os.close(fd)
            try:
                with access_checked("checkpoint file", self.uri):
                    fs.get_file(path, tmp)
                obj = _torch_load_safe(tmp, self.uri)
            finally:
                # An mmap keeps the data reachable after unlink (POSIX).
                os.unlink(tmp)
        self._sd = _state_dict_of(obj, self.uri)
        return self._sd

    def infos(self) -> dict[str, TensorInfo]:
        out = {}
        for name, t in self._load().items():
            try:
                dt = dtype_name(t.dtype)
            except ZooError:
                raise ZooError(
                    f"checkpoint file {self.uri}, tensor {name!r}: unsupported dtype {t.dtype}."
                ) from None
            out[name] = TensorInfo(name, tuple(t.shape), dt, t.numel() * t.element_size())
        return out

    def _tensor(self, name: str) -> torch.Tensor:
        sd = self._load()
        if name not in sd:
            raise ZooError(f"checkpoint file {self.uri} has no tensor {name!r}.")
        return sd[name]

    def read(self, name: str) -> torch.Tensor:
        # clone: never hand out the mmap-backed (and possibly shared) storage.
        return self._tensor(name).detach().clone(memory_format=torch.contiguous_format)

    def _read_raw(self, name: str, start: int, end: int) -> bytes:
        t = self._tensor(name).detach().contiguous().reshape(-1)
        return t.view(torch.uint8)[start:end].numpy().tobytes()


def _torch_load_safe(path: str, uri: str) -> Any:
    """torch.load restricted to tensors and plain containers; never runs pickled code."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            # Legacy (pre-zipfile) checkpoints cannot be memory-mapped.
            if "mmap" not in str(e) and "zipfile" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to retry with weights_only=False; keep only the cause.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        causes = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln]
        first = (causes or lines or [type(e).__name__])[0].rstrip(".")
        raise ZooError(
            f"checkpoint file {uri} cannot be loaded safely: it contains pickled Python objects beyond "
            f"tensors and plain containers ({first}). Loading it would run arbitrary code from the file, "
            "so it is refused. If you trust its origin (e.g. a whole pickled open_clip module from the "
            f"task_vectors repository), convert it once with `tswitch zoo convert {uri} OUT.safetensors "
            "--trust-pickle` and use the safetensors file."
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError) as e:
        raise ZooError(
            f"checkpoint file {uri} is not a readable torch checkpoint ({type(e).__name__}: {e}); "
            "it may be truncated or corrupt."
        ) from None


def _state_dict_of(obj: Any, uri: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ZooError(
            f"checkpoint file {uri} holds a {type(obj).__name__}, not a state dict "
            "(a {name: tensor} mapping, optionally under a \"state_dict\" key)."
        )
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ZooError(f"checkpoint file {uri} contains no tensors.")
    return sd


def open_checkpoint(uri: str, storage_options: dict[str, Any] | None = None) -> CheckpointReader:
    """The right reader for ``uri``.

    * ``*.safetensors`` -> :class:`SafetensorsReader`
    * ``*.pt|.pth|.bin|.ckpt`` -> :class:`TorchStateDictReader` (weights only)
    * a folder with ``model.safetensors.index.json`` or ``model.safetensors``
      (or the index file itself) -> :class:`ShardedSafetensorsReader`
    * a folder with ``pytorch_model.bin`` -> :class:`TorchStateDictReader`

    File URIs are dispatched on their extension without touching storage
    (a missing file is reported on first use); folders are probed.
    """
    uri = uri.rstrip("/") if uri.rstrip("/") else uri
    low = uri.lower()
    if low.endswith(INDEX_FILE):
        return ShardedSafetensorsReader(uri[: -len(INDEX_FILE)].rstrip("/"), storage_options)
    if low.endswith(".safetensors"):
        return SafetensorsReader(uri, storage_options)
    if low.endswith(TORCH_EXTENSIONS):
        return TorchStateDictReader(uri, storage_options)
    fs, path = get_fs(uri, storage_options)
    with access_checked("checkpoint", uri):  # the probes below read the store
        try:
            is_dir = fs.isdir(path)
            exists = is_dir or fs.exists(path)
        except FileNotFoundError:
            is_dir = exists = False
        if is_dir:
            if fs.exists(posixpath.join(path, INDEX_FILE)) or fs.exists(posixpath.join(path, SINGLE_FILE)):
                return ShardedSafetensorsReader(uri, storage_options)
            if fs.exists(posixpath.join(path, "pytorch_model.bin")):
                return TorchStateDictReader(join_uri(uri, "pytorch_model.bin"), storage_options)
    if is_dir:
        raise ZooError(
            f"checkpoint folder {uri} has no {INDEX_FILE}, {SINGLE_FILE} or pytorch_model.bin; "
            "cannot tell which checkpoint to read."
        )
    if not exists:
        raise ZooError(f"checkpoint {uri} does not exist (or is not readable).")
    raise ZooError(
        f"checkpoint {uri} has an unknown format: expected a .safetensors file, a .pt/.pth/.bin state dict, "
        "or an HF checkpoint folder."
    )
