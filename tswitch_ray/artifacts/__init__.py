"""Artifacts layer: switch codec, Parquet parts committed by a manifest, duckdb registry.

* ``encoding.py`` - the switch codec; ``schema.py`` - part schema and manifest model;
* ``writer.py`` - :class:`ArtifactWriter`, the sink that stages parts and commits the manifest last;
* ``reader.py`` - :class:`ArtifactReader`; ``manifest.py`` - :class:`PartInfo`, building and checking the manifest;
* ``integrity.py`` - the digests binding rows, parts and the manifest to each other;
* ``registry.py`` - :class:`Registry`, SQL over every committed set and results table under a root.

Storage itself goes through :mod:`tswitch_ray.io`; ``open_fs``, ``normalize_uri``,
``read_table`` and ``write_table_atomic`` (= :func:`tswitch_ray.io.tables.write_table`)
are re-exported here. See docs/ARTIFACTS.md for the on-disk format.
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
from tswitch_ray.artifacts.manifest import PartInfo
from tswitch_ray.artifacts.reader import ArtifactReader
from tswitch_ray.artifacts.writer import ArtifactWriter
from tswitch_ray.io.fs import normalize_uri, open_fs
from tswitch_ray.io.tables import read_table
from tswitch_ray.io.tables import write_table as write_table_atomic

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
