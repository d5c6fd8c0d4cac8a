"""Object-store access that is denied, through a real S3 server that enforces it (SeaweedFS on 127.0.0.1).

Each case runs `tswitch build` through the CLI with credentials that the
server refuses for one thing (writing the output, reading the zoo), and checks
the user-error contract: exit code 2, one `error:` paragraph that names the
URI and says access was denied, no traceback, and no manifest committed.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest
import yaml

from tswitch_ray.zoo.synth import synth_zoo

from test_build_reconstruct import make_state, write_zoo
from test_cli_errors import assert_refused, run

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    return Path(synth_zoo("vit-b-32", 2, "fp16", str(tmp_path_factory.mktemp("zoo")), seed=4, layers=1))


@pytest.fixture
def bucket(seaweed_s3) -> str:
    _, options_of = seaweed_s3
    name = f"t-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", **options_of("admin")).mkdir(name)
    return name


def _s3_args(seaweed_s3, identity: str) -> list[str]:
    endpoint, _ = seaweed_s3
    return ["--s3-endpoint", endpoint, "-S", f"key={identity}", "-S", f"secret={identity}-secret"]


def _manifests(seaweed_s3, bucket: str) -> list[str]:
    _, options_of = seaweed_s3
    fs = fsspec.filesystem("s3", **options_of("admin"))
    return [p for p in fs.find(bucket) if p.endswith("manifest.json")]


def test_build_output_where_writing_is_denied(zoo, seaweed_s3, bucket, tmp_path):
    out = f"s3://{bucket}/switches"
    result = run("build", "--zoo", zoo, "--out", out, "--executor", "local", "--quiet", "--alpha", "0.5",
                 *_s3_args(seaweed_s3, "reader"))
    flat = assert_refused(result, tmp_path / "none", out, "cannot write artifacts there", "Access Denied")
    assert "credentials" in flat
    assert _manifests(seaweed_s3, bucket) == []
    # The same command with credentials that may write succeeds: the refusal was about access, not the URI.
    ok = run("build", "--zoo", zoo, "--out", out, "--executor", "local", "--quiet", "--alpha", "0.5",
             *_s3_args(seaweed_s3, "admin"))
    assert ok.exit_code == 0, ok.output
    assert _manifests(seaweed_s3, bucket) == [f"{bucket}/switches/manifest.json"]


def _upload_zoo(seaweed_s3, bucket: str, zoo: Path) -> None:
    _, options_of = seaweed_s3
    fsspec.filesystem("s3", **options_of("admin")).put(str(zoo.parent) + "/", f"{bucket}/zoo/", recursive=True)


def test_zoo_manifest_where_reading_is_denied(zoo, seaweed_s3, bucket, tmp_path):
    _upload_zoo(seaweed_s3, bucket, zoo)
    uri = f"s3://{bucket}/zoo/zoo.yaml"
    out = tmp_path / "out"
    result = run("build", "--zoo", uri, "--out", out, "--executor", "local", "--quiet", "--alpha", "0.5",
                 *_s3_args(seaweed_s3, "outsider"))
    assert_refused(result, out, uri, "access denied", "credentials")


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "pt"])
def test_checkpoint_where_reading_is_denied(seaweed_s3, bucket, tmp_path, fmt):
    """Every checkpoint format the readers take, on a bucket the credentials may not read."""
    zoo = write_zoo(tmp_path / "zoo", make_state(seed=5), fmt)
    _upload_zoo(seaweed_s3, bucket, zoo)
    manifest = yaml.safe_load(zoo.read_text())
    manifest["base"] = f"s3://{bucket}/zoo/{manifest['base']}"
    for task in manifest["tasks"]:
        task["uri"] = f"s3://{bucket}/zoo/{task['uri']}"
    local = tmp_path / "zoo.yaml"
    local.write_text(yaml.safe_dump(manifest))
    out = tmp_path / "out"
    result = run("build", "--zoo", local, "--out", out, "--executor", "local", "--quiet", "--alpha", "0.5",
                 *_s3_args(seaweed_s3, "outsider"))
    assert_refused(result, out, manifest["base"], "access denied", "credentials")
