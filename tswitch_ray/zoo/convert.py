"""One-time, explicit conversion of pickled checkpoints to safetensors.

Unpickling runs arbitrary code from the file, so the zoo readers never do it
(they use ``torch.load(weights_only=True)``). Checkpoints that need it - such
as those of the task_vectors repository (Ilharco et al.), which are *whole
pickled modules* (``ImageEncoder`` wrapping an open_clip model; unpickling
them needs ``open_clip`` importable, historically open_clip 2.0.2, and the
task_vectors ``src`` package on the path) - are converted once, by a person
who trusts the file, with ``tswitch zoo convert SRC DST --trust-pickle``.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from typing import Any

import torch

from tswitch_ray.errors import ZooError
from tswitch_ray.io.fs import fs_is_local, open_fs
from tswitch_ray.io.safetensors import save_safetensors


def convert_checkpoint(
    src: str,
    dst: str,
    trust_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Convert the pickled checkpoint ``src`` to the safetensors file ``dst``.

    Refuses unless ``trust_pickle`` is true: loading a pickle executes code
    chosen by whoever made the file. Accepts a whole pickled ``nn.Module``
    (its ``state_dict()`` is taken; task_vectors checkpoints need open_clip
    installed to unpickle, and their tensor names keep the wrapper's prefix,
    e.g. ``model.visual.conv1.weight`` - select them with the manifest's
    include globs), a plain state dict, or ``{"state_dict": {...}}``.
    Non-tensor entries are dropped; every tensor is written contiguous and
    tied (shared-storage) tensors each get their own copy, so every name of
    the state dict is present. Returns ``{tensor name: shape}`` as written.
    """
    if not trust_pickle:
        raise ZooError(
            f"refusing to convert {src}: loading a pickled checkpoint runs arbitrary Python code from the "
            "file (a malicious file can do anything your user can). Only if you trust where it came from, "
            "re-run with --trust-pickle (trust_pickle=True); the result is a safetensors file that is safe "
            "to load from then on."
        )
    if not dst.lower().endswith(".safetensors"):
        raise ZooError(f"conversion target {dst} must be a .safetensors file name.")
    fs, path = open_fs(src, storage_options)
    if not fs.exists(path):
        raise ZooError(f"checkpoint file {src} does not exist (or is not readable).")
    if fs_is_local(fs):
        obj = _load_pickle(path, src)
    else:
        fd, tmp = tempfile.mkstemp(suffix=posixpath.splitext(path)[1] or ".pt", prefix="tswitch-convert-")
        os.close(fd)
        try:
            fs.get_file(path, tmp)
            obj = _load_pickle(tmp, src)
        finally:
            os.unlink(tmp)

    if isinstance(obj, torch.nn.Module):
        sd: Any = obj.state_dict()
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    elif isinstance(obj, dict):
        sd = obj
    elif callable(getattr(obj, "state_dict", None)):
        sd = obj.state_dict()
    else:
        raise ZooError(
            f"checkpoint file {src} holds a {type(obj).__name__}, which is neither a torch module nor a "
            "state dict; nothing to convert."
        )
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ZooError(f"checkpoint file {src} contains no tensors; nothing to convert.")
    save_safetensors(tensors, dst, storage_options, metadata={"format": "pt", "converted_from": src})
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _load_pickle(path: str, uri: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
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
