"""The artifact manifest: what a committed set lists (parts, switches, totals), built from the staged parts.

``manifest.json`` is written last by :class:`~tswitch_ray.artifacts.writer.ArtifactWriter`;
:class:`~tswitch_ray.artifacts.reader.ArtifactReader` trusts nothing else.
docs/ARTIFACTS.md has every field.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import pyarrow as pa
from pydantic import ValidationError

from tswitch_ray import __version__
from tswitch_ray.artifacts.encoding import CODEC_NAME
from tswitch_ray.artifacts.integrity import MANIFEST_DIGEST_KEY, manifest_digest
from tswitch_ray.artifacts.schema import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PARTS_DIR,
    Manifest,
)
from tswitch_ray.errors import ArtifactError

ALPHA_TOL = 1e-9
# The small metadata columns of every part the manifest is computed from.
MANIFEST_COLUMNS = ["task", "tensor", "alpha", "scope", "knob_mode", "numel", "kept", "knob", "payload_bytes",
                    "row_sha256"]


@dataclass
class PartInfo:
    """What the writer records about one part (also its sidecar's content)."""

    shard_id: int
    path: str  # relative to the artifact set's root
    sha256: str
    rows: int
    bytes: int
    payload_bytes: int
    run_key: str
    tensors: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    # sha256 over the part's row_sha256 values (integrity.rows_digest); "" in
    # sidecars of format version 1, whose parts are never reused.
    rows_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_manifest(uri: str, run_key: str, default_name: str, given: dict[str, Any], infos: list[PartInfo],
                   rows: pa.Table) -> dict[str, Any]:
    """The manifest body for the verified parts ``infos`` whose metadata rows are ``rows``.

    ``given`` is what the driver knows (see ``ArtifactWriter.complete``);
    the grid of (task, alpha, tensor) the rows cover is checked against it.
    Longer than a screen: the body is one ``update`` in the manifest's key
    order, which the committed bytes depend on.
    """

    def bad(cause: str) -> ArtifactError:
        return ArtifactError(f"{uri}: cannot commit run {run_key!r}: {cause}.")

    for key in ("zoo", "tasks", "alphas", "scope", "knob_mode"):
        if key not in given:
            raise bad(f"the manifest lacks {key!r}")
    tasks = list(given["tasks"])
    alphas = [float(a) for a in given["alphas"]]
    scope, knob_mode = given["scope"], given["knob_mode"]
    zoo = given["zoo"]
    if isinstance(zoo, str):
        zoo = {"name": zoo, "fingerprint": given.get("fingerprint", "")}

    cols = rows.to_pydict()
    n = rows.num_rows
    tensors = given.get("tensors")
    expected = set(tensors) if tensors else set(cols["tensor"])
    alpha_of = _check_grid(cols, tasks, alphas, scope, knob_mode, expected, bad)
    grid = [(t, a) for t in tasks for a in alphas]
    knob_table, knob_entries = _knob_table(given.get("knobs"), alphas, grid, scope, bad)

    summary: dict[tuple[str, float], dict[str, Any]] = {
        k: {"task": k[0], "alpha": k[1], "tensors": 0, "numel": 0, "kept": 0, "encoded_bytes": 0,
            "knob": knob_table.get(k)} for k in grid
    }
    for i in range(n):
        s = summary[(cols["task"][i], alpha_of[cols["alpha"][i]])]
        s["tensors"] += 1
        s["numel"] += cols["numel"][i]
        s["kept"] += cols["kept"][i]
        s["encoded_bytes"] += cols["payload_bytes"][i]
    numel_of = {name: numel for name, numel in zip(cols["tensor"], cols["numel"])}
    fp32 = 4 * sum(cols["numel"])
    encoded = sum(cols["payload_bytes"])
    totals = dict(given.get("totals") or {})
    totals.update(
        fp32_bytes=fp32,  # one fp32 task vector per (task, alpha) switch it replaces
        task_vectors_fp32_bytes=4 * sum(numel_of.values()) * len(tasks),
        encoded_bytes=encoded,
        file_bytes=sum(p.bytes for p in infos),
        ratio=encoded / fp32 if fp32 else 0.0,
        bits_per_element=8 * encoded / sum(cols["numel"]) if n else 0.0,
    )
    body = {k: v for k, v in given.items() if k not in ("parts", "switches")}
    body.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        name=given.get("name") or default_name,
        run_key=run_key,
        created_at=given.get("created_at") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        tool_version=given.get("tool_version") or __version__,
        zoo=zoo,
        tasks=tasks,
        alphas=alphas,
        codec=given.get("codec") or CODEC_NAME,
        knobs=knob_entries if scope == "model" else None,
        tensors=sorted(expected) if not tensors else list(tensors),
        # A part's tasks stay listed: readers open only the parts of the task they read.
        parts=[{k: v for k, v in p.to_dict().items() if k not in ("alphas", "run_key")} for p in infos],
        switches=list(summary.values()),
        totals=totals,
        extra=dict(given.get("extra") or {}),
    )
    body = json.loads(json.dumps(body))  # the digest is over the body as it reads back
    body[MANIFEST_DIGEST_KEY] = manifest_digest(body)
    try:
        Manifest.model_validate(body)
    except ValidationError as exc:
        raise bad(f"the manifest is invalid: {exc}") from exc
    return body


def _check_grid(cols: dict[str, list[Any]], tasks: list[str], alphas: list[float], scope: str, knob_mode: str,
                expected: set[str], bad: Callable[[str], ArtifactError]) -> dict[float, float]:
    """Check that the rows hold every (task, alpha) with exactly the expected tensors; returns row alpha -> listed alpha."""
    keys = list(zip(cols["task"], cols["alpha"], cols["tensor"]))
    if len(set(keys)) != len(keys):
        raise bad("two parts hold the same (task, alpha, tensor)")
    if set(cols["task"]) - set(tasks):
        raise bad(f"parts hold tasks {sorted(set(cols['task']) - set(tasks))} that the manifest does not list")
    if set(cols["scope"]) - {scope} or set(cols["knob_mode"]) - {knob_mode}:
        raise bad(f"parts were built with scope/knob {sorted(set(cols['scope']))}/{sorted(set(cols['knob_mode']))}, "
                  f"the manifest says {scope}/{knob_mode}")
    alpha_of = {}
    for a in set(cols["alpha"]):
        match = [b for b in alphas if abs(a - b) <= ALPHA_TOL]
        if not match:
            raise bad(f"parts hold alpha {a} that the manifest does not list")
        alpha_of[a] = match[0]
    grid: dict[tuple[str, float], set[str]] = {(t, a): set() for t in tasks for a in alphas}
    for t, a, name in keys:
        grid[(t, alpha_of[a])].add(name)
    for (t, a), names in grid.items():
        if names != expected:
            lacking = sorted(expected - names)
            extra_names = sorted(names - expected)
            raise bad(f"task {t!r} at alpha {a} has {len(names)} of {len(expected)} tensors "
                      f"(missing {lacking[:5]}{'...' if len(lacking) > 5 else ''}"
                      f"{', unexpected ' + str(extra_names[:5]) if extra_names else ''}); a shard is missing")
    return alpha_of


def _knob_table(knobs: Any, alphas: list[float], grid: list[tuple[str, float]], scope: str,
                bad: Callable[[str], ArtifactError]) -> tuple[dict[tuple[str, float], float], list[dict[str, Any]]]:
    """Scope "model": the per-(task, alpha) knobs given by the driver, checked complete; else empty."""
    knob_table: dict[tuple[str, float], float] = {}
    knob_entries: list[dict[str, Any]] = []
    if scope != "model":
        return knob_table, knob_entries
    if not knobs:
        raise bad("scope 'model' needs the per-(task, alpha) knob table 'knobs'")
    for e in knobs:
        a = [b for b in alphas if abs(float(e["alpha"]) - b) <= ALPHA_TOL]
        if a and e.get("knob") is not None:
            knob_table[(e["task"], a[0])] = float(e["knob"])
            # Extra keys the driver records per knob (e.g. kept) are kept.
            knob_entries.append({**e, "alpha": a[0], "knob": float(e["knob"])})
    lacking_k = [k for k in grid if k not in knob_table]
    if lacking_k:
        raise bad(f"the knob table lacks {lacking_k[:5]}")
    return knob_table, knob_entries


def load_manifest(raw: bytes, uri: str) -> tuple[dict[str, Any], Manifest]:
    """Parse and check ``manifest.json`` of the set at ``uri``: the one gate every reader of a set goes through.

    Refused (``ArtifactError`` naming the file and the field): not JSON, another
    ``format``, a ``format_version`` other than :data:`FORMAT_VERSION` (version
    1 has no digests to check), a body that does not match its
    ``manifest_sha256``, a body the :class:`Manifest` model rejects, and the
    inconsistencies of :func:`_check_consistent`.
    """
    where = f"{uri}/{MANIFEST_NAME}"
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ArtifactError(f"{where}: not a valid artifact manifest (not JSON: {exc}).") from exc
    if not isinstance(body, dict):
        raise ArtifactError(f"{where}: not a valid artifact manifest (a JSON {type(body).__name__}, not an object).")
    fmt, version = body.get("format"), body.get("format_version")
    if fmt != FORMAT:
        raise ArtifactError(f"{where}: field 'format' is {fmt!r}; this version of tswitch-ray reads only "
                            f"{FORMAT!r} artifact sets.")
    if version == 1 and not isinstance(version, bool):
        raise ArtifactError(
            f"{where}: field 'format_version' is 1: the set was written by an older tswitch-ray "
            f"(tool_version {body.get('tool_version')!r}), without the digests that bind its rows to this manifest, "
            "so it cannot be checked. Rebuild it from the same zoo with the same options to use it.")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ArtifactError(
            f"{where}: field 'format_version' is {version!r}, which this version of tswitch-ray does not know "
            f"(it reads {FORMAT_VERSION}); read the set with the tool that wrote it "
            f"(tool_version {body.get('tool_version')!r}) or rebuild it.")
    stated = body.get(MANIFEST_DIGEST_KEY)
    actual = manifest_digest(body)
    if stated != actual:
        cause = (f"field {MANIFEST_DIGEST_KEY!r} is missing" if not isinstance(stated, str)
                 else f"field {MANIFEST_DIGEST_KEY!r} says {stated[:12]}…, the content hashes to {actual[:12]}…")
        raise ArtifactError(
            f"{where}: the manifest does not match its own digest ({cause}): it was edited or corrupted after "
            "it was committed. Do not use this set: rebuild it, or restore manifest.json from a good copy.")
    try:
        m = Manifest.model_validate(body)
    except ValidationError as exc:
        raise ArtifactError(f"{where}: not a valid artifact manifest ({exc}).") from exc
    _check_consistent(m, where)
    return body, m


def _check_consistent(m: Manifest, where: str) -> None:
    """Refuse a manifest whose knob table contradicts its scope, or whose parts lie outside its run."""

    def bad(cause: str) -> ArtifactError:
        return ArtifactError(f"{where}: {cause}; the manifest is inconsistent, rebuild the set.")

    if m.scope == "tensor" and m.knobs is not None:
        raise bad("field 'knobs' is set, but scope is 'tensor', whose knobs are per tensor in the rows "
                  "(a task-wide table would contradict them)")
    if m.scope == "model":
        if not m.knobs:
            raise bad("scope 'model' needs the per-(task, alpha) knob table 'knobs', which is missing")
        seen: set[tuple[str, float]] = set()
        for e in m.knobs:
            alpha = [a for a in m.alphas if abs(a - e.alpha) <= ALPHA_TOL]
            if e.task not in m.tasks or not alpha:
                raise bad(f"field 'knobs' has an entry for task {e.task!r}, alpha {e.alpha}, which the set "
                          "does not list")
            if (e.task, alpha[0]) in seen:
                raise bad(f"field 'knobs' has two entries for task {e.task!r}, alpha {alpha[0]}")
            seen.add((e.task, alpha[0]))
        lacking = [(t, a) for t in m.tasks for a in m.alphas if (t, a) not in seen]
        if lacking:
            raise bad(f"field 'knobs' lacks {lacking[:5]}")
    if m.cut == "authors" and m.scope != "tensor":
        raise bad(f"field 'cut' is 'authors' but field 'scope' is {m.scope!r}; the authors' cut is per tensor")
    # A version lists the parts it keeps from earlier versions where they are:
    # any parts/<key>/ folder of this set, never a path outside it.
    for p in m.parts:
        bits = p.path.split("/")
        if len(bits) != 3 or bits[0] != PARTS_DIR or ".." in bits or "" in bits or "\\" in p.path or ":" in p.path:
            raise bad(f"field 'parts' lists {p.path!r}, which is not a part of this set ({PARTS_DIR}/<key>/<file>)")
