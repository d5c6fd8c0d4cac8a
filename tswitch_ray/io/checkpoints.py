"""Lazy, per-tensor checkpoint readers: the reader protocol, tensor infos, dtypes and ``.pt`` state dicts.

A reader knows a checkpoint's tensor names, shapes and dtypes from its header
alone (``infos()``) and reads one tensor at a time (``read(name)``), so a
pipeline can stream N checkpoints tensor by tensor without ever holding a whole
model. ``read_range`` / ``read_ranges`` fetch byte ranges of a tensor's stored
data (for safetensors files exactly those bytes, one ranged GET on s3://).

Readers are cheap to create (nothing is read until first use) and picklable
(the fsspec handle and caches are dropped and rebuilt), so they can be shipped
to Ray workers. The safetensors readers live in :mod:`tswitch_ray.io.safetensors`.
"""

from __future__ import annotations

import math
import os
import pickle
import posixpath
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from tswitch_ray.errors import ZooError
from tswitch_ray.io.fs import access_checked, fs_is_local, open_fs

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


def is_known_dtype(dtype: str) -> bool:
    return dtype in _ST_DTYPES


def known_dtypes() -> list[str]:
    return list(_ST_DTYPES)


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

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of one tensor's stored (little-endian) data; offsets inside the tensor."""
        ...

    def read_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes]:
        """Several ``(name, start, end)`` ranges at once (concurrent requests where the store allows)."""
        ...


@runtime_checkable
class TaskVectorSource(Protocol):
    """A task that yields its task vector τ directly (a LoRA adapter: s · B·A), not only its weights θt.

    Readers without this method are dense checkpoints: τ = θt − θ0 from ``read``.
    """

    def task_vector(self, name: str, base: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """τ of tensor ``name`` in float32 on ``base``'s device; ``base`` is θ0 of that tensor."""
        ...


def bytes_to_tensor(data: bytes | bytearray, info: TensorInfo) -> torch.Tensor:
    """A tensor of ``info``'s shape and dtype over ``data`` (its stored little-endian bytes)."""
    tdtype = dtype_to_torch(info.dtype)
    if info.numel == 0:
        return torch.empty(info.shape, dtype=tdtype)
    # bytearray: the tensor must own writable memory, not alias fsspec's bytes.
    buf = data if isinstance(data, bytearray) else bytearray(data)
    t = torch.frombuffer(buf, dtype=tdtype)
    if sys.byteorder != "little":  # safetensors is little-endian on disk
        t = t.view(torch.uint8).view(-1, dtype_itemsize(info.dtype)).flip(-1).contiguous().view(tdtype).flatten()
    return t.reshape(info.shape)


class LazyFs:
    """Mixin: an fsspec handle created on first use and dropped on pickling."""

    uri: str
    _storage_options: dict[str, Any] | None

    def _fs_path(self):
        if getattr(self, "_fs", None) is None:
            self._fs, self._path = open_fs(self.uri, self._storage_options)
        return self._fs, self._path

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for k in self._transient:
            state[k] = None
        return state

    _transient: tuple[str, ...] = ("_fs",)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class TorchStateDictReader(LazyFs):
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

    def read_range(self, name: str, start: int, end: int) -> bytes:
        t = self._tensor(name).detach().contiguous().reshape(-1)
        return t.view(torch.uint8)[start:end].numpy().tobytes()

    def read_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes]:
        return [self.read_range(n, s, e) for n, s, e in requests]


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
