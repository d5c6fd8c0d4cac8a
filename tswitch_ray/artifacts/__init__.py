"""Artifacts layer: switch codec, Parquet store with atomic commit, duckdb registry.

See docs/ARTIFACTS.md for the on-disk format.
"""

from tswitch_ray.artifacts.encoding import (
    CODEC_NAME,
    EncodedSwitch,
    decode_switch,
    encode_switch,
    entropy_bound_bits,
    payload_sha256,
)
from tswitch_ray.artifacts.registry import Registry
from tswitch_ray.artifacts.schema import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    METADATA_COLUMNS,
    PART_SCHEMA,
    PAYLOAD_COLUMNS,
    RESULTS_NAME,
    RESULTS_SCHEMA,
    Manifest,
)
from tswitch_ray.artifacts.store import (
    ArtifactReader,
    ArtifactWriter,
    PartInfo,
    normalize_uri,
    open_fs,
    read_table,
    write_table_atomic,
)

__all__ = [
    "CODEC_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "METADATA_COLUMNS",
    "PART_SCHEMA",
    "PAYLOAD_COLUMNS",
    "RESULTS_NAME",
    "RESULTS_SCHEMA",
    "ArtifactReader",
    "ArtifactWriter",
    "EncodedSwitch",
    "Manifest",
    "PartInfo",
    "Registry",
    "decode_switch",
    "encode_switch",
    "entropy_bound_bits",
    "normalize_uri",
    "open_fs",
    "payload_sha256",
    "read_table",
    "write_table_atomic",
]
