"""Parquet schema of switch parts and the manifest model (docs/ARTIFACTS.md is the reference)."""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

FORMAT = "tswitch-ray/switches"
# 2: rows carry ``row_sha256`` (their key and content bound to their payload),
# parts ``rows_sha256`` and the manifest ``manifest_sha256`` (docs/ARTIFACTS.md
# "Integrity"). Version 1 sets have none of these and are refused: rebuild them.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
PARTS_DIR = "parts"
RESULTS_NAME = "results.parquet"

# Columns holding the encoded payload; everything else is small metadata.
PAYLOAD_COLUMNS = ("mask_bits", "rem_bits", "sign_bits")

PART_SCHEMA = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),
        pa.field("tensor", pa.string(), nullable=False),
        pa.field("alpha", pa.float64(), nullable=False),
        pa.field("scope", pa.string(), nullable=False),
        pa.field("knob_mode", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.int64()), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("numel", pa.int64(), nullable=False),
        pa.field("n_pos", pa.int64()),
        pa.field("n_neg", pa.int64()),
        pa.field("d_pos", pa.int64()),
        pa.field("d_neg", pa.int64()),
        pa.field("t_pos", pa.float64()),
        pa.field("t_neg", pa.float64()),
        pa.field("kept", pa.int64(), nullable=False),
        pa.field("sum_abs", pa.float64()),
        pa.field("sum_sq", pa.float64()),
        # Null for scope "model": the task-wide knob lives in the manifest.
        pa.field("knob", pa.float64()),
        pa.field("codec", pa.string(), nullable=False),
        pa.field("k", pa.int32(), nullable=False),
        pa.field("inverted", pa.bool_(), nullable=False),
        pa.field("mask_bits", pa.large_binary(), nullable=False),
        pa.field("rem_bits", pa.large_binary(), nullable=False),
        pa.field("sign_bits", pa.large_binary(), nullable=False),
        pa.field("payload_bytes", pa.int64(), nullable=False),
        pa.field("payload_sha256", pa.string(), nullable=False),
        # sha256 over ROW_DIGEST_COLUMNS (docs/ARTIFACTS.md "Integrity").
        pa.field("row_sha256", pa.string(), nullable=False),
    ]
)

# What a row's ``row_sha256`` covers, in this order: every column but the codec
# streams (covered through ``payload_sha256``) and the digest itself. Fixed for
# format version 2; a column added later is not covered unless the version moves.
ROW_DIGEST_COLUMNS = (
    "task", "tensor", "alpha", "scope", "knob_mode", "shape", "dtype", "numel",
    "n_pos", "n_neg", "d_pos", "d_neg", "t_pos", "t_neg", "kept", "sum_abs", "sum_sq", "knob",
    "codec", "k", "inverted", "payload_bytes", "payload_sha256",
)
ROW_DIGEST_TAG = "tswitch-ray/switches/row/v2"

METADATA_COLUMNS = tuple(name for name in PART_SCHEMA.names if name not in PAYLOAD_COLUMNS)

# Columns every result table (results.parquet written by evaluations) is read
# with; files may have more, and missing ones read as null.
RESULTS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),  # folder of the results file (filled by the registry)
        pa.field("artifact_uri", pa.string()),  # artifact set evaluated, if any
        pa.field("method", pa.string()),
        pa.field("task", pa.string()),
        pa.field("alpha", pa.float64()),
        pa.field("accuracy", pa.float64()),
        pa.field("storage_bytes", pa.int64()),
    ]
)


class PartEntry(BaseModel):
    """One committed part as listed in the manifest."""

    model_config = ConfigDict(extra="allow")

    shard_id: int
    path: str  # relative to the artifact set's root
    sha256: str
    rows_sha256: str  # sha256 over the part's row_sha256 values in row order
    rows: int
    bytes: int
    payload_bytes: int = 0
    tensors: list[str] = Field(default_factory=list)
    tasks: list[str] | None = None  # the tasks whose rows the part holds (one, since versions exist)


class ZooRef(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    fingerprint: str
    uri: str | None = None


class KnobEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    task: str
    alpha: float
    knob: float


class SwitchSummary(BaseModel):
    """Per-(task, α) totals, computed by the writer at commit."""

    task: str
    alpha: float
    tensors: int
    numel: int
    kept: int
    encoded_bytes: int
    knob: float | None = None


class Manifest(BaseModel):
    """``OUT/manifest.json``: written last; an artifact set without one does not exist."""

    model_config = ConfigDict(extra="allow")

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    name: str | None = None
    run_key: str
    created_at: str
    tool_version: str
    zoo: ZooRef
    tasks: list[str]
    alphas: list[float]
    scope: Literal["tensor", "model"]
    # The threshold cut rule (docs/MATH.md "Cut rules"); sets written before it was recorded used "exact".
    cut: Literal["authors", "exact"] = "exact"
    knob_mode: Literal["rms", "mean"]
    codec: str
    knobs: list[KnobEntry] | None = None
    parts: list[PartEntry]
    switches: list[SwitchSummary]
    totals: dict[str, Any]
    extra: dict[str, Any] = Field(default_factory=dict)
    manifest_sha256: str  # over the canonical body without this key (docs/ARTIFACTS.md "Integrity")
