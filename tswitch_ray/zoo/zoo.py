"""A zoo: one base checkpoint and N fine-tuned task checkpoints, read lazily."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tswitch_ray.errors import ZooError
from tswitch_ray.io.checkpoints import CheckpointReader, TensorInfo
from tswitch_ray.io.readers import open_checkpoint, open_task
from tswitch_ray.io.fs import open_fs
from tswitch_ray.zoo.keymap import (
    KeyRules,
    head_patterns,
    looks_like_head,
    matches_any,
    suggest_task_specific,
    unmap_name,
)
from tswitch_ray.zoo.manifest import ZooManifest, read_manifest, resolve_uri
from tswitch_ray.zoo.mapped import MappedReader

log = logging.getLogger(__name__)
_FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})

# Bytes hashed from each end of every base tensor by Zoo.fingerprint().
FINGERPRINT_SAMPLE_BYTES = 64 * 1024
_FINGERPRINT_VERSION = b"tswitch-zoo-fingerprint-v1"


class Zoo:
    """A base checkpoint, task checkpoints in manifest order, and a tensor selection.

    Nothing is read on construction; headers are read on first use and cached
    by the readers. A Zoo is picklable (readers drop their fsspec handles).
    """

    def __init__(
        self,
        name: str,
        base: CheckpointReader,
        tasks: Mapping[str, CheckpointReader],
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        manifest_uri: str | None = None,
        storage_options: dict[str, Any] | None = None,
        task_specific: Sequence[str] = (),
        key_rules: Mapping[str, KeyRules | None] | None = None,
        base_rules: KeyRules | None = None,
    ) -> None:
        if not tasks:
            raise ZooError(f"zoo {name!r} has no tasks; a zoo needs at least one fine-tuned checkpoint.")
        self.name = name
        # Every reader is seen under the zoo's (the base's) tensor names; a task
        # without rules gets a detected prefix, if its names need one.
        self.base = MappedReader(base, base_rules or KeyRules())
        rules = dict(key_rules or {})
        self.tasks: dict[str, MappedReader] = {t: MappedReader(r, rules.get(t), self.base) for t, r in tasks.items()}
        self.include = list(include)
        self.exclude = list(exclude)
        self.task_specific = list(task_specific)
        self.manifest_uri = manifest_uri
        self._storage_options = dict(storage_options or {})
        self._infos: dict[str, TensorInfo] | None = None
        self._fingerprint: str | None = None

    @classmethod
    def from_manifest(
        cls, manifest: ZooManifest, manifest_uri: str, storage_options: dict[str, Any] | None = None
    ) -> Zoo:
        base = open_checkpoint(resolve_uri(manifest_uri, manifest.base), storage_options)
        tasks = {t.name: open_task(resolve_uri(manifest_uri, t.uri), base, storage_options) for t in manifest.tasks}
        return cls(manifest.name, base, tasks, manifest.include, manifest.exclude, manifest_uri, storage_options,
                   task_specific=manifest.task_specific, key_rules={t.name: t.key_rules() for t in manifest.tasks},
                   base_rules=manifest.base_key_rules())

    @classmethod
    def from_uris(
        cls,
        name: str,
        base: str,
        tasks: Mapping[str, str],
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        storage_options: dict[str, Any] | None = None,
        **layout: Any,
    ) -> Zoo:
        """A zoo without a manifest file (URIs must be absolute or relative to the cwd); ``layout``:
        ``task_specific``, ``key_rules``, ``base_rules`` as for the constructor."""
        base_reader = open_checkpoint(base, storage_options)
        return cls(
            name,
            base_reader,
            {k: open_task(v, base_reader, storage_options) for k, v in tasks.items()},
            include,
            exclude,
            storage_options=storage_options,
            **layout,
        )

    # -- description ----------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def _where(self) -> str:
        return f"zoo {self.name!r}" + (f" (manifest {self.manifest_uri})" if self.manifest_uri else "")

    def selects(self, tensor_name: str) -> bool:
        """Whether the include/exclude globs select ``tensor_name`` (task-specific tensors never are)."""
        return any(fnmatch.fnmatchcase(tensor_name, g) for g in self.include) and not any(
            fnmatch.fnmatchcase(tensor_name, g) for g in self.exclude
        ) and not self.is_task_specific(tensor_name)

    def is_task_specific(self, name: str, stored: str | None = None) -> bool:
        """Whether ``task_specific`` matches the zoo's name ``name`` or the checkpoint's own name ``stored``."""
        return matches_any(name, self.task_specific) or (stored is not None and matches_any(stored, self.task_specific))

    def _base_infos(self) -> dict[str, TensorInfo]:
        try:
            return self.base.infos()
        except ZooError as e:
            raise ZooError(f"{self._where()}, base checkpoint: {e}") from None

    def tensor_infos(self) -> dict[str, TensorInfo]:
        """Base tensors selected by include/exclude, in the base file's order."""
        if self._infos is None:
            self._infos = {n: i for n, i in self._base_infos().items() if self.selects(n)}
        return dict(self._infos)

    def reader(self, which: str) -> CheckpointReader:
        """The reader of ``"base"`` or of a task name."""
        if which == "base":
            return self.base
        try:
            return self.tasks[which]
        except KeyError:
            raise ZooError(f"{self._where()} has no task {which!r}; tasks: {', '.join(self.tasks)}.") from None

    def read(self, name: str, which: str = "base") -> torch.Tensor:
        """Tensor ``name`` of the base (``which="base"``) or of task ``which``."""
        return self.reader(which).read(name)

    # -- checks ---------------------------------------------------------
    def validate(self) -> dict[str, TensorInfo]:
        """Check every task has every selected float tensor with the base's shape and dtype.

        Reads headers only. Non-float tensors (position ids, counters, masks)
        are not weights: they are copied, never compared. Returns the selected
        tensor infos; raises ZooError naming the task, its file, the tensor and
        the cause (with a count of further problems, if any) and, when every
        mismatch is in a tensor that looks like a head, the ``task_specific:``
        globs that would store them per task. Detected key mappings are logged.
        """
        all_base = self._base_infos()
        infos = self.tensor_infos()
        if not infos:
            sample = ", ".join(list(all_base)[:5])
            raise ZooError(
                f"{self._where()}: include {self.include} / exclude {self.exclude} select none of the "
                f"{len(all_base)} tensors of base checkpoint {self.base.uri} (its first tensors: {sample})."
            )
        problems: list[str] = []
        unreadable = 0
        layout_hint = ""
        heads: dict[str, list[str]] = {}  # mismatching tensor -> its checkpoint's names, for the suggestion
        for task, reader in self.tasks.items():
            try:
                task_infos = reader.infos()
            except ZooError as e:
                problems.append(f"{self._where()}, task {task!r}: {e}")
                unreadable += 1
                continue
            found = self._task_problems(task, reader, infos, task_infos)
            problems += [p for _, p in found]
            heads.update({name: list(task_infos) for name, _ in found})
            self._note_layout(task, reader, all_base, task_infos)
            lacking = sum(1 for n, _ in found if n not in task_infos)
            if found and 2 * lacking >= len(infos) and not layout_hint:
                layout_hint = (f" Task {task!r} lacks {lacking} of the {len(infos)} tensors: its names may follow "
                               f"another layout (its first: {', '.join(list(task_infos)[:3])}; the base's: "
                               f"{', '.join(list(infos)[:3])}); give the task `prefix:` or `rename:` rules in the "
                               "zoo manifest.")
        if problems:
            more = f" ({len(problems) - 1} more problem(s) of this kind found.)" if len(problems) > 1 else ""
            hint = suggest_task_specific(heads) if not unreadable else None
            if hint is not None:
                globs = ", ".join(f'"{g}"' for g in hint)
                more += (f" Every mismatching tensor ({', '.join(sorted(heads))}) looks like a task head: if each task "
                         f"has its own, add `task_specific: [{globs}]` to the zoo manifest; those tensors are then "
                         "stored per task, exactly, and never switched nor merged.")
            raise ZooError(problems[0] + more + layout_hint)
        return infos

    def _task_problems(self, task: str, reader: MappedReader, infos: Mapping[str, TensorInfo],
                       task_infos: Mapping[str, TensorInfo]) -> list[tuple[str, str]]:
        """``(tensor, message)`` for each selected float tensor a task lacks or has with another shape/dtype."""
        out: list[tuple[str, str]] = []
        for name, bi in infos.items():
            if bi.dtype not in _FLOAT_DTYPES:
                continue  # buffers are copied per task, never compared as weights
            ti = task_infos.get(name)
            if ti is None:
                mapped = f" (task names mapped by {list(reader.pairs())})" if reader.pairs() else ""
                out.append((name, (
                    f"{self._where()}: task {task!r} checkpoint {reader.uri} has no tensor {name!r}, "
                    f"which base checkpoint {self.base.uri} has (shape {list(bi.shape)} {bi.dtype}){mapped}.")))
            elif ti.shape != bi.shape or ti.dtype != bi.dtype:
                what = "shape" if ti.shape != bi.shape else "dtype"
                out.append((name, (
                    f"{self._where()}: tensor {name!r} {what} mismatch: {list(ti.shape)} {ti.dtype} in task "
                    f"{task!r} checkpoint {reader.uri} but {list(bi.shape)} {bi.dtype} in base checkpoint "
                    f"{self.base.uri}; the task was not fine-tuned from this base (or not the same architecture).")))
        return out

    def _note_layout(self, task: str, reader: MappedReader, all_base: Mapping[str, TensorInfo],
                     task_infos: Mapping[str, TensorInfo]) -> None:
        """Log what a user must know: a detected key mapping, and head-like tensors only a task has."""
        if reader.detected:
            (old, new), = reader.pairs()
            what = f"strips the prefix {old!r}" if old else f"adds the prefix {new!r}"
            log.warning("zoo %r: task %r checkpoint %s names its tensors differently from the base; the zoo %s "
                        "(detected; write `prefix:`/`rename:` on the task to make it explicit).",
                        self.name, task, reader.uri, what)
        only = [n for n, ti in task_infos.items() if n not in all_base and ti.dtype in _FLOAT_DTYPES
                and not self.is_task_specific(n, reader.names().get(n))]
        heads = [n for n in only if looks_like_head(n, list(task_infos))]
        if heads:
            log.warning("zoo %r: task %r has tensors the base lacks (%s); they are not switched and a "
                        "reconstruction leaves them out. To keep them, add `task_specific: %s` to the zoo manifest.",
                        self.name, task, ", ".join(heads[:5]), json.dumps(head_patterns(heads)))

    # -- layouts and task-specific tensors -------------------------------------
    def key_layout(self, task: str) -> dict[str, Any]:
        """How task ``task``'s checkpoint names its tensors, as the artifact manifest records it.

        ``rules``: the ``[stored prefix, zoo prefix]`` pairs in effect;
        ``detected``: they were found, not written; ``absent``: base tensors
        the task does not have (a reconstruction leaves them out); ``names``:
        ``{zoo name: stored name}`` where the rules inverted give another name.
        """
        reader = self.reader(task)
        pairs = reader.pairs()
        names = reader.names()
        own = {c for c, _ in self.own_tensor_names(task)}
        exceptions = {}
        for c, s in names.items():
            if c not in own and unmap_name(pairs, c) != s:
                exceptions[c] = s
        absent = [n for n in self._base_infos() if n not in names]
        return {"rules": [list(p) for p in pairs], "detected": reader.detected, "absent": absent,
                "names": exceptions}

    def own_tensor_names(self, task: str) -> list[tuple[str, str]]:
        """``(zoo name, role)`` of the tensors a task keeps as its own, in its file's order.

        Role ``task_specific``: matched by the manifest's ``task_specific``
        globs (any dtype, any shape, in the base or not). Role ``buffer``:
        every other non-float tensor (stored only where it differs from the
        base's, see :meth:`read_own_tensors`).
        """
        reader = self.reader(task)
        out = []
        for c, ti in reader.infos().items():
            if self.is_task_specific(c, reader.names()[c]):
                out.append((c, "task_specific"))
            elif ti.dtype not in _FLOAT_DTYPES:
                out.append((c, "buffer"))
        return out

    def read_own_tensors(self, task: str) -> list[tuple[str, str, str, torch.Tensor]]:
        """``(zoo name, stored name, role, tensor)`` to store for ``task``: its task-specific tensors, and its
        buffers that the base lacks or holds with other values (the others are the base's, bit for bit)."""
        reader = self.reader(task)
        base_infos = self._base_infos()
        out = []
        for c, role in self.own_tensor_names(task):
            t = reader.read(c)
            if role == "buffer" and c in base_infos:
                b = self.base.read(c)
                if b.dtype == t.dtype and b.shape == t.shape and torch.equal(b, t):
                    continue
            out.append((c, reader.names()[c], role, t))
        return out

    def layout_identity(self) -> dict[str, Any] | None:
        """What a build's resume key must add for task-specific tensors and key rules; None when neither is used."""
        rules = {t: [list(p) for p in r.pairs()] for t, r in self.tasks.items() if r.pairs()}
        if not self.task_specific and not rules and not self.base.pairs():
            return None
        return {"task_specific": self.task_specific, "rules": rules, "base_rules": [list(p) for p in self.base.pairs()]}

    def fingerprint(self) -> str:
        """Identify the base model, so artifacts built for another base are detected.

        sha256 over, for each selected base tensor sorted by name: its name,
        shape, dtype and the sha256 of its first and last
        ``FINGERPRINT_SAMPLE_BYTES`` (64 KiB) of stored bytes (the whole
        tensor when smaller than 128 KiB). The content sample catches a
        different base of the same architecture (same header) at the cost of
        at most 128 KiB per tensor read, and does not depend on the file
        format, tensor order in the file or storage location.
        """
        if self._fingerprint is not None:
            return self._fingerprint
        infos = self.tensor_infos()
        if not infos:
            self.validate()  # raises the "nothing selected" error
        names = sorted(infos)
        k = FINGERPRINT_SAMPLE_BYTES
        requests: list[tuple[str, int, int]] = []
        for n in names:
            nb = infos[n].nbytes
            if nb <= 2 * k:
                requests.append((n, 0, nb))
            else:
                requests += [(n, 0, k), (n, nb - k, nb)]
        try:
            chunks = self.base.read_ranges(requests)
        except ZooError as e:
            raise ZooError(f"{self._where()}, base checkpoint: {e}") from None
        samples: dict[str, Any] = {n: hashlib.sha256() for n in names}
        for (n, _, _), chunk in zip(requests, chunks):
            samples[n].update(chunk)
        h = hashlib.sha256(_FINGERPRINT_VERSION)
        for n in names:
            i = infos[n]
            h.update(f"\n{n}\t{list(i.shape)}\t{i.dtype}\t".encode())
            h.update(samples[n].digest())
        self._fingerprint = h.hexdigest()
        return self._fingerprint

    def files_identity(self) -> str:
        """sha256 over every checkpoint file's path, size and modification stamp (mtime, ETag, ...).

        Cheap (metadata only) and changes when a checkpoint is replaced at the
        same path — what a resumed or cached build must notice. Sharded
        folders contribute every file in them.
        """
        h = hashlib.sha256(b"tswitch-files-v1")
        for uri in [self.base.uri] + [self.tasks[t].uri for t in self.task_names]:
            h.update(self._stamps(uri))
        return h.hexdigest()

    def checkpoint_identity(self, which: str) -> str:
        """sha256 over the path, size and modification stamp of one checkpoint's files (``"base"`` or a task).

        What an incremental build compares per task: a task whose files did
        not change keeps its committed switches (:meth:`files_identity` is
        the same over every checkpoint).
        """
        return hashlib.sha256(b"tswitch-files-v1" + self._stamps(self.reader(which).uri)).hexdigest()

    def _stamps(self, uri: str) -> bytes:
        fs, path = open_fs(uri, self._storage_options)
        try:
            infos = [fs.info(f) for f in sorted(fs.find(path))] if fs.isdir(path) else [fs.info(path)]
        except FileNotFoundError as e:
            raise ZooError(f"{self._where()}: checkpoint {uri} does not exist.") from e
        out = []
        for info in infos:
            stamp = [info.get(k) for k in ("mtime", "ETag", "LastModified", "last_modified", "created") if
                     info.get(k) is not None]
            out.append(f"{info.get('name')}\t{info.get('size')}\t{stamp}\n")
        return "".join(out).encode()

    def __repr__(self) -> str:
        return f"Zoo({self.name!r}, base={self.base.uri!r}, tasks={self.task_names})"


def load_zoo(manifest_uri: str, storage_options: dict[str, Any] | None = None) -> Zoo:
    """Read, validate (schema only) and resolve the manifest at ``manifest_uri``.

    ``manifest_uri`` may be a local path or any fsspec URL (file://, s3://,
    memory://). Relative checkpoint paths resolve from the manifest's folder.
    ``storage_options`` (e.g. s3 endpoint and keys) apply to every remote URI.
    Checkpoint headers are not read here; call :meth:`Zoo.validate`.
    """
    manifest = read_manifest(manifest_uri, storage_options)
    return Zoo.from_manifest(manifest, manifest_uri, storage_options)


def check_finite(tensor: torch.Tensor, file: str, tensor_name: str) -> None:
    """Raise ZooError if a floating-point ``tensor`` holds NaN or infinite values."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int((~finite).sum()) - n_nan
    raise ZooError(
        f"checkpoint file {file}, tensor {tensor_name!r}: contains {n_nan} NaN and {n_inf} infinite values "
        f"out of {tensor.numel()}; the checkpoint is corrupt or its training diverged."
    )
