"""Hugging Face ``save_pretrained`` folders as outputs: what ``from_pretrained`` loads.

A folder gets its weights as ``model.safetensors``, or, over the shard size,
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``
(transformers' own names and index format), each file with the ``format: pt``
metadata transformers checks; and the plain configuration files of the
checkpoint folder it was made from (:func:`copy_config_files`: ``config.json``,
``generation_config.json``, the image processor and tokenizer files; never
code, never a weights index). A weight that transformers ties to another one
for this config (``lm_head.weight`` of a Llama with ``tie_word_embeddings``)
is not written, as ``save_pretrained`` does not write it: ``from_pretrained``
ties it again.

Two writers, both committed by a :class:`~tswitch_ray.io.sink.FolderSink`
(nothing visible before its marker is written last):

* :class:`HFFolderWriter` takes a stream of ``(name, tensor)`` — what
  ``tswitch reconstruct`` produces, whatever tensors it yields — and stages
  one shard at a time (at most one shard of tensors in memory); publishing
  moves the staged files to their final names.
* :func:`publish_from_parts` writes a folder from staged safetensors parts
  (a merge's shard outputs) by tensor copies, one tensor in memory at a time.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tswitch_ray.errors import ConfigError, ZooError
from tswitch_ray.io.atomic import FileDigest, atomic_write_fs, sha256_hex
from tswitch_ray.io.checkpoints import dtype_name
from tswitch_ray.io.fs import open_fs
from tswitch_ray.io.safetensors import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsReader,
    SafetensorsStreamWriter,
    concat_safetensors,
)
from tswitch_ray.io.sink import FolderSink

# transformers 4's default; one shard of tensors is held in memory while a stream is written.
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Plain data files of a checkpoint folder besides *.json (tokenizer vocabularies); code (*.py) is never copied.
_DATA_FILES = ("vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
# JSON files that describe other weights or another output, not the model.
_NOT_COPIED = (INDEX_FILE, "pytorch_model.bin.index.json", "adapter_config.json", "merge.json", "reconstruct.json")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5·10⁹ bytes, ``"500MiB"`` -> 500·2²⁰, as transformers' ``max_shard_size``; ints are bytes."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if not m:
            raise ConfigError(f"shard size {size!r} is not a size like 5GB, 500MB or 2GiB.")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise ConfigError(f"shard size must be positive, got {size!r}.")
    return value


def checkpoint_folder(uri: str) -> str:
    """The folder of a checkpoint URI: the folder itself, or the one holding a file (``model.safetensors``, ``.bin``)."""
    tail = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    if tail.endswith((".safetensors", ".json", ".bin", ".pt", ".pth", ".ckpt")):
        return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."
    return uri.rstrip("/")


def config_files(folder: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """The plain configuration files of a checkpoint folder, by name; ``ZooError`` when it has no ``config.json``."""
    fs, path = open_fs(folder, dict(storage_options or {}))
    try:
        names = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        names = []
    if "config.json" not in names:
        raise ZooError(f"{folder}: no config.json; a Hugging Face folder output copies the configuration of the "
                       "checkpoint's save_pretrained folder, so the task (or the base) must be one.")
    keep = [n for n in sorted(names) if (n.endswith(".json") and n not in _NOT_COPIED) or n in _DATA_FILES]
    files = {n: fs.cat_file(posixpath.join(path, n)) for n in keep}
    try:
        if not isinstance(json.loads(files["config.json"]), dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ZooError(f"{folder}/config.json: not a valid config ({e}); the output would not load.") from None
    return files


def first_config_files(checkpoint_uris: Sequence[str], storage_options: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """:func:`config_files` of the first checkpoint whose folder has a ``config.json`` (a task's, else the base's)."""
    for uri in checkpoint_uris[:-1]:
        try:
            return config_files(checkpoint_folder(uri), storage_options)
        except ZooError:
            continue
    return config_files(checkpoint_folder(checkpoint_uris[-1]), storage_options)


def tied_targets(config_json: bytes) -> dict[str, str]:
    """{tied weight: the weight it is tied to} that transformers sets up for this ``config.json``'s architecture.

    The model class is looked up by name in transformers only (never code from the folder) and built on
    the meta device (no memory). Unknown architectures tie nothing here: every tensor is written.
    """
    import transformers
    from transformers import AutoConfig

    raw = json.loads(config_json)
    arch = (raw.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel) or "model_type" not in raw:
        return {}
    try:
        config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in ("architectures", "auto_map", "transformers_version")})
        with torch.device("meta"):
            model = cls(config)
    except (ValueError, KeyError, TypeError, AttributeError):  # a config this transformers cannot build: tie nothing
        return {}
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def _shard_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _index_bytes(weight_map: Mapping[str, str], total_size: int) -> bytes:
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(weight_map)}, indent=2).encode()


class HFFolderWriter:
    """Stage a stream of ``(name, tensor)`` as a Hugging Face folder ``rel`` of ``sink``; one shard in memory.

    ``files``: the configuration files to add (:func:`config_files`); tensors transformers ties for that
    ``config.json`` are skipped. Tensors are written as given (their dtype is the output's).
    Drive it as ``write(...)`` for each tensor, ``finish()`` -> staged digests, then ``publish`` inside
    :meth:`FolderSink.complete`.
    """

    def __init__(self, sink: FolderSink, files: Mapping[str, bytes], *, rel: str = "", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 metadata: Mapping[str, str] | None = None) -> None:
        self.sink, self.files, self.rel = sink, dict(files), rel.strip("/")
        self.max_bytes = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **dict(metadata or {})}
        self.tied = tied_targets(self.files["config.json"])
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._shards: list[tuple[FileDigest, list[str]]] = []
        self._written: set[str] = set()
        self._skipped: dict[str, str] = {}
        self._total = 0
        self._staged: list[tuple[FileDigest, str]] = []  # (staged file, final name)

    def _path(self, name: str) -> str:
        return f"{self.rel}/{name}" if self.rel else name

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.tied:
            self._skipped[name] = self.tied[name]
            return
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffered + nbytes > self.max_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().cpu()
        self._buffered += nbytes
        self._written.add(name)
        self._total += nbytes

    def _flush(self) -> None:
        """Stage the buffered shard, tensor by tensor (no second copy of it in memory)."""
        layout = [(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in self._buffer.items()]
        uri = self.sink.staged(self._path(f".part-{len(self._shards):05d}.safetensors"))
        with SafetensorsStreamWriter(uri, layout, storage_options=self.sink.storage_options, metadata=self.metadata,
                                     hashed=True) as writer:
            for name, tensor in self._buffer.items():
                writer.write(name, tensor)
        self._shards.append((writer.digest(), list(self._buffer)))
        self._buffer, self._buffered = {}, 0

    def finish(self) -> list[FileDigest]:
        """Stage the last shard, the index (several shards) and the configuration files; the staged digests."""
        if self._buffer or not self._shards:
            self._flush()
        orphans = {t: s for t, s in self._skipped.items() if s not in self._written}
        if orphans:
            t, s = next(iter(orphans.items()))
            raise ZooError(f"{self.sink.uri}: {t} is tied to {s} by its config.json, but the weights have no {s}.")
        names = _shard_names(len(self._shards))
        self._staged = [(d, final) for (d, _), final in zip(self._shards, names)]
        if len(names) > 1:
            weight_map = {t: final for (_, ts), final in zip(self._shards, names) for t in ts}
            self._staged.append((self.sink.write(self._path(".index.json"), _index_bytes(weight_map, self._total)), INDEX_FILE))
        for fname, data in self.files.items():
            self._staged.append((self.sink.write(self._path(f".file-{fname}"), data), fname))
        return [d for d, _ in self._staged]

    def publish(self) -> list[FileDigest]:
        """Move the staged files to their final names (inside :meth:`FolderSink.complete`); the outputs."""
        fs = self.sink.fs
        out = []
        for digest, final in self._staged:
            dst = f"{self.sink.root}/{self._path(final)}"
            fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            fs.mv(open_fs(digest.uri, self.sink.storage_options)[1], dst)
            out.append(FileDigest(f"{self.sink.uri}/{self._path(final)}", digest.sha256, digest.bytes))
        return out


def publish_from_parts(sink: FolderSink, rel: str, parts: Sequence[str], order: Sequence[str], sizes: Mapping[str, int],
                       files: Mapping[str, bytes], *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                       metadata: Mapping[str, str] | None = None, storage_options: dict[str, Any] | None = None) -> list[FileDigest]:
    """Write the Hugging Face folder ``rel`` of ``sink`` from staged safetensors ``parts`` (inside :meth:`FolderSink.complete`).

    ``order``: the tensors in file order, ``sizes`` their bytes; shards are packed in that order up to
    ``max_shard_size`` (a larger tensor gets a shard of its own), tied weights are left out.
    """
    limit = parse_size(max_shard_size)
    tied = tied_targets(files["config.json"])
    groups: list[list[str]] = [[]]
    size = 0
    for name in (n for n in order if n not in tied):
        if groups[-1] and size + sizes[name] > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += sizes[name]
    base = f"{sink.uri}/{rel.strip('/')}"
    meta = {"format": "pt", **dict(metadata or {})}
    names = _shard_names(len(groups))
    owner = {n: part for part in parts for n in SafetensorsReader(part, storage_options).infos()}
    outputs = [concat_safetensors(sorted({owner[n] for n in group}), f"{base}/{fname}", order=group, metadata=meta,
                                  storage_options=storage_options)  # only the parts this shard's tensors are in
               for group, fname in zip(groups, names)]
    extra = dict(files)
    if len(groups) > 1:
        extra[INDEX_FILE] = _index_bytes({t: f for g, f in zip(groups, names) for t in g}, sum(sizes[n] for g in groups for n in g))
    for fname, data in extra.items():
        atomic_write_fs(sink.fs, f"{sink.root}/{rel.strip('/')}/{fname}", data)
        outputs.append(FileDigest(f"{base}/{fname}", sha256_hex(data), len(data)))
    return outputs
