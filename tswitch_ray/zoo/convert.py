"""One-time, explicit conversion of torch checkpoints (``torch.save`` files) to safetensors, streamed.

A plain state dict needs no trust: it is read with the zoo's safe reader
(:class:`~tswitch_ray.io.checkpoints.TorchStateDictReader`, ``weights_only``,
memory-mapped). Checkpoints that need unpickling - such as those of the
task_vectors repository (Ilharco et al.), which are *whole pickled modules*
(``ImageEncoder`` wrapping an open_clip model; unpickling them needs
``open_clip`` importable, historically open_clip 2.0.2, and the task_vectors
``src`` package on the path) - run code from the file, so they are converted
only by a person who trusts it, with ``tswitch zoo convert SRC... --trust-pickle``.

Either way the tensors are memory-mapped where the file allows it (zipfile
checkpoints, i.e. everything ``torch.save`` wrote since torch 1.6) and written
one at a time with :class:`~tswitch_ray.io.safetensors.SafetensorsStreamWriter`,
so peak memory is about one tensor, not the whole checkpoint twice (see
docs/RESULTS.md, "zoo convert").
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from tswitch_ray.errors import ZooError
from tswitch_ray.io.checkpoints import TensorInfo, TorchStateDictReader, dtype_name
from tswitch_ray.io.fs import fs_is_local, open_fs
from tswitch_ray.io.safetensors import SafetensorsStreamWriter

_NEEDS_PICKLE = "cannot be loaded safely"  # TorchStateDictReader's refusal of a file that needs unpickling


def convert_checkpoint(
    src: str,
    dst: str,
    trust_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Convert the torch checkpoint ``src`` to the safetensors file ``dst``, tensor by tensor.

    A state dict (``{name: tensor}``, or under ``"state_dict"``) converts
    without trust. A file that needs unpickling (a whole pickled
    ``nn.Module``, whose ``state_dict()`` is taken; task_vectors checkpoints
    need open_clip installed, and their tensor names keep the wrapper's
    prefix, e.g. ``model.visual.conv1.weight``) is refused unless
    ``trust_pickle``: loading it executes code chosen by whoever made the
    file. Non-tensor entries are dropped; tied (shared-storage) tensors each
    get their own copy. ``dst`` appears only when complete. Returns
    ``{tensor name: shape}`` as written.
    """
    if not dst.lower().endswith(".safetensors"):
        raise ZooError(f"conversion target {dst} must be a .safetensors file name.")
    with _state_dict(src, trust_pickle, storage_options) as sd:
        layout = [TensorInfo(k, tuple(v.shape), _dtype(src, k, v), v.numel() * v.element_size()) for k, v in sd.items()]
        with SafetensorsStreamWriter(dst, layout, storage_options, metadata={"format": "pt", "converted_from": src}) as w:
            for name in sd:
                w.write(name, sd[name])
    return {i.name: i.shape for i in layout}


def convert_checkpoints(
    sources: Sequence[str],
    out_dir: str,
    trust_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Convert several checkpoints, each to ``out_dir/<stem>.safetensors``; returns the files written, in order.

    Every output name is checked before the first conversion starts (two
    sources with the same stem would overwrite each other), and every file
    is written whole or not at all.
    """
    targets = [f"{out_dir.rstrip('/')}/{posixpath.splitext(posixpath.basename(s))[0]}.safetensors" for s in sources]
    seen: dict[str, str] = {}
    for s, t in zip(sources, targets):
        if t in seen:
            raise ZooError(f"{seen[t]} and {s} would both be converted to {t}; convert them into different folders.")
        seen[t] = s
    for s, t in zip(sources, targets):
        convert_checkpoint(s, t, trust_pickle=trust_pickle, storage_options=storage_options)
    return targets


def _dtype(src: str, name: str, t: torch.Tensor) -> str:
    try:
        return dtype_name(t.dtype)
    except ZooError:
        raise ZooError(f"checkpoint file {src}, tensor {name!r}: dtype {t.dtype} has no safetensors equivalent.") from None


class _LazyTensors(Mapping[str, torch.Tensor]):
    """The safe reader's tensors by name, in file order, read one at a time."""

    def __init__(self, reader: TorchStateDictReader) -> None:
        self._reader = reader
        self._infos = reader.infos()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._reader.read(name)  # a copy of this one tensor, paged in from the mapped file

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)


@contextmanager
def _state_dict(src: str, trust_pickle: bool, storage_options: dict[str, Any] | None) -> Iterator[Mapping[str, torch.Tensor]]:
    reader = TorchStateDictReader(src, storage_options)
    try:
        lazy = _LazyTensors(reader)
    except ZooError as e:
        if _NEEDS_PICKLE not in str(e):
            raise
        if not trust_pickle:
            raise ZooError(
                f"refusing to convert {src}: it is not a plain state dict, and loading it runs arbitrary Python "
                "code from the file (a malicious file can do anything your user can). Only if you trust where it "
                "came from, re-run with --trust-pickle (trust_pickle=True); the result is a safetensors file that "
                "is safe to load from then on."
            ) from None
        with _trusted_state_dict(src, storage_options) as sd:
            yield sd
        return
    yield lazy


@contextmanager
def _trusted_state_dict(src: str, storage_options: dict[str, Any] | None) -> Iterator[dict[str, torch.Tensor]]:
    fs, path = open_fs(src, storage_options)
    if fs_is_local(fs):
        yield _tensors_of(_load_pickle(path, src), src)
        return
    fd, tmp = tempfile.mkstemp(suffix=posixpath.splitext(path)[1] or ".pt", prefix="tswitch-convert-")
    os.close(fd)
    try:
        fs.get_file(path, tmp)
        yield _tensors_of(_load_pickle(tmp, src), src)
    finally:
        os.unlink(tmp)  # an mmap keeps the data reachable after unlink (POSIX)


def _tensors_of(obj: Any, src: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module) or (not isinstance(obj, dict) and callable(getattr(obj, "state_dict", None))):
        sd: Any = obj.state_dict()
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    elif isinstance(obj, dict):
        sd = obj
    else:
        raise ZooError(
            f"checkpoint file {src} holds a {type(obj).__name__}, which is neither a torch module nor a "
            "state dict; nothing to convert."
        )
    tensors = {str(k): v.detach() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ZooError(f"checkpoint file {src} contains no tensors; nothing to convert.")
    return tensors


def _load_pickle(path: str, uri: str) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zipfile" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=False)  # legacy format: cannot be mapped
    except (ModuleNotFoundError, AttributeError) as e:
        raise ZooError(
            f"checkpoint file {uri} cannot be unpickled here: it references Python code that is not "
            f"importable ({type(e).__name__}: {e}). Whole pickled modules need the package that defined "
            "them (task_vectors checkpoints need open_clip, ideally the version they were saved with, "
            "and the task_vectors `src` package on PYTHONPATH)."
        ) from None
    except Exception as e:  # corrupt or truncated file: report it as a user error
        raise ZooError(
            f"checkpoint file {uri} is not a readable torch checkpoint ({type(e).__name__}: {e})."
        ) from None
