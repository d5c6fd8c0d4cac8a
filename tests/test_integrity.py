"""Integrity (issue 15 point 2): a reader never returns a switch that is not the one the manifest committed.

Each test tampers with a set built by the real CLI (the tiny zoo of
test_build_reconstruct, ``--executor local``) as a bad copy, a careless edit or
a swapped file would, then checks that ``tswitch reconstruct`` (exit 2, one
``error:`` paragraph naming the file, no traceback, no output file) and
``ArtifactReader`` with default settings both refuse it, and that the registry
lists refused sets as invalid. The forgeries are consistent wherever the
attacker could make them so without rewriting the manifest: a replaced part has
the original's size, and its rows' payload and row digests match their
(relabelled) content. The digests are recomputed here from docs/ARTIFACTS.md
("Integrity") with hashlib, json and pyarrow only.

New product functions are imported inside the tests, so each test fails on its
own on code without them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_build_reconstruct import assert_matches, make_state, reference, write_zoo
from typer.testing import CliRunner

from tswitch_ray.cli import app
from tswitch_ray.errors import ArtifactError

ALPHAS = (0.5, 0.9)
# docs/ARTIFACTS.md "Integrity": what row_sha256 covers, in this order.
ROW_DIGEST_COLUMNS = (
    "task", "tensor", "alpha", "scope", "knob_mode", "shape", "dtype", "numel",
    "n_pos", "n_neg", "d_pos", "d_neg", "t_pos", "t_neg", "kept", "sum_abs", "sum_sq", "knob",
    "codec", "k", "inverted", "payload_bytes", "payload_sha256",
)
ROW_TAG = "tswitch-ray/switches/row/v2"


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


# --- the documented digests, recomputed independently ------------------------------------

def _canon(v):
    if isinstance(v, float):
        return v.hex()
    if isinstance(v, list):
        return [_canon(x) for x in v]
    return v


def doc_row_digest(row: dict) -> str:
    body = [ROW_TAG, *(_canon(row[c]) for c in ROW_DIGEST_COLUMNS)]
    return hashlib.sha256(json.dumps(body, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


def doc_rows_digest(digests: list[str]) -> str:
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def doc_json_digest(body: dict, key: str) -> str:
    rest = {k: v for k, v in body.items() if k != key}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def doc_payload_digest(row: dict) -> str:
    h = hashlib.sha256()
    for c in ("mask_bits", "rem_bits", "sign_bits"):
        h.update(len(row[c]).to_bytes(8, "little"))
        h.update(row[c])
    return h.hexdigest()


# --- sets to tamper with -------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict:
    """One committed set per scope, built once; tests tamper with copies."""
    root = tmp_path_factory.mktemp("integrity")
    states = make_state(seed=5)
    zoo = write_zoo(root / "zoo", states, "safetensors")
    sets = {}
    for scope in ("tensor", "model"):
        out = root / f"built-{scope}"
        r = run("build", "--zoo", zoo, "--out", out, "--scope", scope, "--executor", "local", "--quiet",
                *[x for a in ALPHAS for x in ("--alpha", a)])
        assert r.exit_code == 0, r.output
        sets[scope] = out
    return {"states": states, "zoo": zoo, "sets": sets}


def copy_set(pristine: dict, scope: str, dst: Path) -> Path:
    shutil.copytree(pristine["sets"][scope], dst)
    return dst


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def write_manifest(out: Path, m: dict, redigest: bool) -> None:
    """Write an edited manifest; ``redigest`` recomputes its manifest_sha256 as the docs define it."""
    if redigest:
        m["manifest_sha256"] = doc_json_digest(m, "manifest_sha256")
    (out / "manifest.json").write_text(json.dumps(m, indent=1))


def part_holding(out: Path, tensor: str, task: str = "cars") -> Path:
    """The part holding ``task``'s rows of ``tensor`` (a part holds one task's rows of one shard)."""
    (part,) = [p for p in manifest_of(out)["parts"] if tensor in p["tensors"] and p["tasks"] == [task]]
    return out / part["path"]


def forge_from(donor: Path, victim: Path, task: str) -> None:
    """Overwrite ``victim`` with ``donor``'s rows relabelled as ``task``, every row digest recomputed (each row
    consistent on its own), at ``victim``'s byte size; trailing rows are left out if the donor's are larger."""
    rows = pq.read_table(donor).to_pylist()
    for row in rows:
        row["task"] = task
        row["row_sha256"] = doc_row_digest(row)
        assert row["payload_sha256"] == doc_payload_digest(row)
    schema = pq.read_schema(victim).remove_metadata()
    while True:
        try:
            write_same_size(victim, pa.Table.from_pylist(rows, schema=schema))
            return
        except AssertionError:
            if len(rows) == 1:
                raise
            rows = rows[:-1]


def write_same_size(path: Path, table: pa.Table) -> None:
    """Replace the Parquet file ``path`` by ``table``, padded to the original's byte size.

    The padding is an extra, uncompressed string column (readers ignore columns
    they do not know), so each pad character adds one byte to the file.
    """
    size = path.stat().st_size
    streams = ("mask_bits", "rem_bits", "sign_bits", "pad")
    small = [n for n in table.column_names if n not in streams]

    def serialise(pad: int) -> bytes:
        padded = table.append_column("pad", pa.array(["x" * pad] + [""] * (table.num_rows - 1), pa.string()))
        buf = pa.BufferOutputStream()
        pq.write_table(padded, buf, compression={n: "none" if n in streams else "zstd" for n in padded.column_names},
                       write_page_checksum=True, use_dictionary=small, write_statistics=small, store_schema=False)
        return buf.getvalue().to_pybytes()

    estimate = size - len(serialise(0))
    assert estimate >= 0, "the forged part is larger than the original; cannot pad it to the same size"
    for pad in sorted(range(max(0, estimate - 8), estimate + 8), key=lambda p: abs(p - estimate)):
        data = serialise(pad)
        if len(data) == size:
            path.write_bytes(data)
            return
    raise AssertionError("could not pad the forged part to the original's size")


def reconstruct_refused(out: Path, tmp_path: Path, *needles: str, task: str = "cars") -> str:
    """`tswitch reconstruct` exits 2 with one error paragraph holding ``needles``, and writes nothing."""
    dst_dir = tmp_path / "rebuilt"
    dst_dir.mkdir(exist_ok=True)
    r = run("reconstruct", "--artifacts", out, "--task", task, "--alpha", 0.5, "--out", dst_dir / "x.safetensors")
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    assert r.stderr.startswith("error:"), r.stderr
    flat = " ".join(r.stderr.split())
    for needle in needles:
        assert needle in flat, f"{needle!r} not in: {flat}"
    assert list(dst_dir.iterdir()) == [], "reconstruct left an output (or a temporary file) behind"
    return flat


# --- tampered parts ------------------------------------------------------------------------

def test_part_replaced_by_one_with_another_tasks_switches_is_refused(pristine, tmp_path):
    out = copy_set(pristine, "tensor", tmp_path / "set")
    part = part_holding(out, "embed.weight")
    rel = part.relative_to(out).as_posix()
    # cars' part now carries dtd's switches relabelled "cars", each row's digest recomputed.
    forge_from(part_holding(out, "embed.weight", "dtd"), part, "cars")

    from tswitch_ray.artifacts import ArtifactReader

    reader = ArtifactReader(str(out))  # default settings; the part has its recorded size, so it opens
    with pytest.raises(ArtifactError, match="part-") as exc:
        reader.switch("cars", 0.5, "embed.weight")
    assert rel in str(exc.value) and "replaced" in str(exc.value)
    with pytest.raises(ArtifactError, match=rel):
        list(ArtifactReader(str(out)).iter_switches("cars", 0.9))
    with pytest.raises(ArtifactError, match=rel):
        ArtifactReader(str(out), verify="full")
    reconstruct_refused(out, tmp_path, rel, "replaced")


def test_row_whose_key_was_edited_is_refused(pristine, tmp_path):
    out = copy_set(pristine, "tensor", tmp_path / "set")
    part = part_holding(out, "embed.weight")
    rows = pq.read_table(part).to_pylist()
    key = {(r["task"], r["alpha"], r["tensor"]): i for i, r in enumerate(rows)}
    i, j = key[("cars", 0.5, "embed.weight")], key[("cars", 0.9, "embed.weight")]
    rows[i]["alpha"], rows[j]["alpha"] = 0.9, 0.5  # relabelled in place; every digest column untouched
    write_same_size(part, pa.Table.from_pylist(rows, schema=pq.read_schema(part).remove_metadata()))

    from tswitch_ray.artifacts import ArtifactReader

    with pytest.raises(ArtifactError, match="does not match its row_sha256") as exc:
        ArtifactReader(str(out)).switch("cars", 0.5, "embed.weight")
    assert "task 'cars'" in str(exc.value) and "embed.weight" in str(exc.value)
    reconstruct_refused(out, tmp_path, part.relative_to(out).as_posix(), "row_sha256")


# --- tampered manifests --------------------------------------------------------------------

@pytest.mark.parametrize("scope,edit", [("model", "knob"), ("tensor", "task name"), ("tensor", "part sha256")])
def test_edited_manifest_is_refused_on_open(pristine, tmp_path, scope, edit):
    out = copy_set(pristine, scope, tmp_path / "set")
    m = manifest_of(out)
    if edit == "knob":
        m["knobs"][0]["knob"] *= 2
    elif edit == "task name":
        m["tasks"] = ["cars", "svhn"]
    else:
        m["parts"][0]["sha256"] = "0" * 64
    write_manifest(out, m, redigest=False)

    from tswitch_ray.artifacts import ArtifactReader

    with pytest.raises(ArtifactError, match="manifest_sha256") as exc:
        ArtifactReader(str(out))
    assert f"{out}/manifest.json" in str(exc.value) and "edited" in str(exc.value)
    reconstruct_refused(out, tmp_path, f"{out}/manifest.json", "manifest_sha256")


def test_knobs_table_in_a_tensor_scope_manifest_is_refused_by_cli_and_api(pristine, tmp_path):
    out = copy_set(pristine, "tensor", tmp_path / "set")
    m = manifest_of(out)
    m["knobs"] = [{"task": t, "alpha": a, "knob": 1.0} for t in m["tasks"] for a in m["alphas"]]
    write_manifest(out, m, redigest=True)  # a consistent digest: only the knob rule can refuse it

    from tswitch_ray.artifacts import ArtifactReader

    with pytest.raises(ArtifactError) as exc:
        ArtifactReader(str(out))
    api = " ".join(str(exc.value).split())
    assert "field 'knobs' is set, but scope is 'tensor'" in api and f"{out}/manifest.json" in api
    cli = reconstruct_refused(out, tmp_path, "field 'knobs' is set, but scope is 'tensor'")
    assert cli == f"error: {api}"  # the CLI says exactly what the API says


@pytest.mark.parametrize("version,needle", [(3, "does not know"), (1, "Rebuild it")])
def test_unknown_or_old_format_version_is_refused_and_listed_invalid(pristine, tmp_path, version, needle):
    root = tmp_path / "root"
    good = copy_set(pristine, "tensor", root / "good")
    bad = copy_set(pristine, "tensor", root / "bad")
    m = manifest_of(bad)
    m["format_version"] = version
    write_manifest(bad, m, redigest=True)

    from tswitch_ray.artifacts import ArtifactReader

    with pytest.raises(ArtifactError, match="format_version") as exc:
        ArtifactReader(str(bad))
    assert needle in str(exc.value) and f"{bad}/manifest.json" in str(exc.value)
    reconstruct_refused(bad, tmp_path, "format_version", needle)

    r = run("registry", "query", "select uri, valid, problem from artifacts order by uri", "--root", root,
            "--format", "csv")
    assert r.exit_code == 0, r.output
    listed = {row["uri"]: row for row in csv.DictReader(io.StringIO(r.stdout))}
    assert set(listed) == {str(good), str(bad)}
    assert listed[str(good)]["valid"] == "true" and listed[str(good)]["problem"] == ""
    assert listed[str(bad)]["valid"] == "false" and "format_version" in listed[str(bad)]["problem"]
    # ... and its switches are not offered as usable.
    r = run("registry", "query", "select distinct uri from switches", "--root", root, "--format", "csv")
    assert [row["uri"] for row in csv.DictReader(io.StringIO(r.stdout))] == [str(good)]


def test_registry_verify_parts_finds_a_forged_part(pristine, tmp_path):
    root = tmp_path / "root"
    out = copy_set(pristine, "tensor", root / "set")
    part = part_holding(out, "embed.weight")
    forge_from(part_holding(out, "embed.weight", "dtd"), part, "cars")

    from tswitch_ray.artifacts import Registry

    t = Registry(str(root), verify_parts=True).query("select valid, problem from artifacts")
    assert t.column("valid").to_pylist() == [False]
    assert part.relative_to(out).as_posix() in t.column("problem")[0].as_py()


# --- what a good set looks like ------------------------------------------------------------

@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_good_set_is_valid_and_reconstructs_as_before(pristine, tmp_path, scope):
    out = copy_set(pristine, scope, tmp_path / "root" / "set")
    r = run("registry", "query", "select uri, valid, problem from artifacts", "--root", tmp_path / "root",
            "--format", "csv")
    assert r.exit_code == 0, r.output
    assert list(csv.DictReader(io.StringIO(r.stdout))) == [{"uri": str(out), "valid": "true", "problem": ""}]
    for task in ("cars", "dtd"):
        for alpha in ALPHAS:
            dst = tmp_path / f"{task}-{alpha}.safetensors"
            r = run("reconstruct", "--artifacts", out, "--task", task, "--alpha", alpha, "--out", dst)
            assert r.exit_code == 0, r.output
            assert_matches(dst, reference(pristine["states"], task, alpha, scope, "rms")[0])


def test_digests_are_the_documented_ones(pristine):
    for scope, out in pristine["sets"].items():
        m = manifest_of(out)
        assert m["format_version"] == 2
        assert m["manifest_sha256"] == doc_json_digest(m, "manifest_sha256")
        for p in m["parts"]:
            rows = pq.read_table(out / p["path"]).to_pylist()
            for row in rows:
                assert row["payload_sha256"] == doc_payload_digest(row)
                assert row["row_sha256"] == doc_row_digest(row), (scope, row["task"], row["tensor"])
            assert p["rows_sha256"] == doc_rows_digest([r["row_sha256"] for r in rows])
            sidecar = json.loads((out / (p["path"] + ".sha256")).read_text())
            assert sidecar["rows_sha256"] == p["rows_sha256"]


def test_staged_part_of_format_version_1_is_not_reused(pristine, tmp_path):
    """A sidecar without rows_sha256 (version 1) is recomputed, never committed into a version 2 set."""
    out = copy_set(pristine, "tensor", tmp_path / "set")
    m = manifest_of(out)
    sidecar = out / (m["parts"][0]["path"] + ".sha256")
    info = json.loads(sidecar.read_text())
    info.pop("rows_sha256", None)  # as a version 1 writer left it
    sidecar.write_text(json.dumps(info))

    from tswitch_ray.artifacts import ArtifactWriter

    assert not ArtifactWriter(str(out), m["run_key"]).has_part(m["parts"][0]["shard_id"])


# --- merge outputs -------------------------------------------------------------------------

def test_merge_output_is_verified_against_its_marker(pristine, tmp_path):
    from tswitch_ray.io.sink import verify_marker

    merged = tmp_path / "merged"
    r = run("merge", "--zoo", pristine["zoo"], "--method", "ta", "--out", merged, "--executor", "local", "--quiet")
    assert r.exit_code == 0, r.output
    marker = verify_marker(str(merged), "merge.json", fmt="tswitch-ray/merge")
    assert marker is not None and [o["path"] for o in marker["outputs"]] == ["merged.safetensors"]
    assert marker["marker_sha256"] == doc_json_digest(marker, "marker_sha256")
    assert verify_marker(str(tmp_path / "nothing"), "merge.json") is None

    good = (merged / "merged.safetensors").read_bytes()
    flipped = bytearray(good)
    flipped[-1] ^= 0x01  # same size, one weight changed
    (merged / "merged.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match="merged.safetensors") as exc:
        verify_marker(str(merged), "merge.json")
    assert "checksum" in str(exc.value) and "Remove" in str(exc.value)
    (merged / "merged.safetensors").write_bytes(good)

    body = json.loads((merged / "merge.json").read_text())
    edited = {**body, "outputs": [{**body["outputs"][0], "sha256": hashlib.sha256(bytes(flipped)).hexdigest()}]}
    (merged / "merge.json").write_text(json.dumps(edited))
    with pytest.raises(ArtifactError, match="marker_sha256"):
        verify_marker(str(merged), "merge.json")
    escaping = {**body, "outputs": [{"path": "../elsewhere.safetensors", "sha256": "0" * 64, "bytes": 1}]}
    escaping["marker_sha256"] = doc_json_digest(escaping, "marker_sha256")
    (merged / "merge.json").write_text(json.dumps(escaping))
    with pytest.raises(ArtifactError, match="not a file inside the folder"):
        verify_marker(str(merged), "merge.json")
    old = {k: v for k, v in body.items() if k != "marker_sha256"} | {"format_version": 1}
    (merged / "merge.json").write_text(json.dumps(old))
    with pytest.raises(ArtifactError, match="format_version"):
        verify_marker(str(merged), "merge.json")


def test_part_without_the_digest_columns_is_refused(pristine, tmp_path):
    """A part rewritten without some checked column (its row_sha256 column intact) is refused, not a crash."""
    out = copy_set(pristine, "tensor", tmp_path / "set")
    part = part_holding(out, "embed.weight")
    table = pq.read_table(part).drop_columns(["sum_sq"])
    pq.write_table(table, part)

    from tswitch_ray.artifacts import ArtifactReader

    m = manifest_of(out)
    m["parts"] = [{**p, "bytes": part.stat().st_size} if (out / p["path"]) == part else p for p in m["parts"]]
    write_manifest(out, m, redigest=True)  # sizes made to agree: only the part's content can refuse it
    with pytest.raises(ArtifactError, match="lacks the columns \\['sum_sq'\\]"):
        ArtifactReader(str(out)).switch("cars", 0.5, "embed.weight")
    reconstruct_refused(out, tmp_path, "sum_sq")
