"""A zoo: one base checkpoint and N fine-tuned task checkpoints, read lazily."""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tswitch_ray.errors import ZooError
from tswitch_ray.io.checkpoints import CheckpointReader, TensorInfo
from tswitch_ray.io.readers import open_checkpoint, open_task
from tswitch_ray.io.fs import open_fs
from tswitch_ray.zoo.manifest import ZooManifest, read_manifest, resolve_uri

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
    ) -> None:
        if not tasks:
            raise ZooError(f"zoo {name!r} has no tasks; a zoo needs at least one fine-tuned checkpoint.")
        self.name = name
        self.base = base
        self.tasks: dict[str, CheckpointReader] = dict(tasks)
        self.include = list(include)
        self.exclude = list(exclude)
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
        return cls(manifest.name, base, tasks, manifest.include, manifest.exclude, manifest_uri, storage_options)

    @classmethod
    def from_uris(
        cls,
        name: str,
        base: str,
        tasks: Mapping[str, str],
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        storage_options: dict[str, Any] | None = None,
    ) -> Zoo:
        """A zoo without a manifest file (URIs must be absolute or relative to the cwd)."""
        base_reader = open_checkpoint(base, storage_options)
        return cls(
            name,
            base_reader,
            {k: open_task(v, base_reader, storage_options) for k, v in tasks.items()},
            include,
            exclude,
            storage_options=storage_options,
        )

    # -- description ----------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def _where(self) -> str:
        return f"zoo {self.name!r}" + (f" (manifest {self.manifest_uri})" if self.manifest_uri else "")

    def selects(self, tensor_name: str) -> bool:
        """Whether the include/exclude globs select ``tensor_name``."""
        return any(fnmatch.fnmatchcase(tensor_name, g) for g in self.include) and not any(
            fnmatch.fnmatchcase(tensor_name, g) for g in self.exclude
        )

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
        """Check every task has every selected tensor with the base's shape and dtype.

        Reads headers only. Returns the selected tensor infos; raises
        ZooError naming the task, its file, the tensor and the cause (with a
        count of further problems, if any).
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
        for task, reader in self.tasks.items():
            try:
                task_infos = reader.infos()
            except ZooError as e:
                problems.append(f"{self._where()}, task {task!r}: {e}")
                continue
            for name, bi in infos.items():
                ti = task_infos.get(name)
                if ti is None:
                    problems.append(
                        f"{self._where()}: task {task!r} checkpoint {reader.uri} has no tensor {name!r}, "
                        f"which base checkpoint {self.base.uri} has (shape {list(bi.shape)} {bi.dtype})."
                    )
                elif ti.shape != bi.shape or ti.dtype != bi.dtype:
                    what = "shape" if ti.shape != bi.shape else "dtype"
                    problems.append(
                        f"{self._where()}: tensor {name!r} {what} mismatch: {list(ti.shape)} {ti.dtype} in task "
                        f"{task!r} checkpoint {reader.uri} but {list(bi.shape)} {bi.dtype} in base checkpoint "
                        f"{self.base.uri}; the task was not fine-tuned from this base (or not the same architecture)."
                    )
        if problems:
            more = f" ({len(problems) - 1} more problem(s) of this kind found.)" if len(problems) > 1 else ""
            raise ZooError(problems[0] + more)
        return infos

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
        uris = [self.base.uri] + [self.tasks[t].uri for t in self.task_names]
        for uri in uris:
            fs, path = open_fs(uri, self._storage_options)
            try:
                infos = [fs.info(f) for f in sorted(fs.find(path))] if fs.isdir(path) else [fs.info(path)]
            except FileNotFoundError as e:
                raise ZooError(f"{self._where()}: checkpoint {uri} does not exist.") from e
            for info in infos:
                stamp = [info.get(k) for k in ("mtime", "ETag", "LastModified", "last_modified", "created") if
                         info.get(k) is not None]
                h.update(f"{info.get('name')}\t{info.get('size')}\t{stamp}\n".encode())
        return h.hexdigest()

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
