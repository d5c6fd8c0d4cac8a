"""Byte identity: every artifact, merge output and results table equals the one recorded in golden.json.

Issue 13 restructures the code ("behaviour unchanged"); this test proves it on
small seeded inputs: `tswitch build` on safetensors, sharded HF and .pt zoos,
local and on S3, scopes "tensor" and "model", several α, on Ray and in-process;
`tswitch reconstruct`; `tswitch merge` for every method with its defaults and
with other options; and the results table of `tswitch eval` on a tiny demo zoo.
The cases and inputs are in golden/cases.py; the digests (semantic content only:
no paths, times or incidental metadata) in golden/digest.py.

golden.json was recorded from the code before the restructure with
``PYTHONPATH=. python tests/golden/record.py``. Re-record only for an output
change that is meant, and say which in the commit.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from golden import cases, digest

GOLDEN_FILE = Path(__file__).parent / "golden" / "golden.json"
GOLDEN: dict = json.loads(GOLDEN_FILE.read_text(encoding="utf-8"))
RECORDED_ON: dict = json.loads((GOLDEN_FILE.parent / "machine.json").read_text(encoding="utf-8"))

pytestmark = [pytest.mark.slow, pytest.mark.s3]


@pytest.fixture(scope="module")
def computed(s3_server, tmp_path_factory) -> dict:
    """Every case's digest from the code of this checkout (all CLI runs happen here, once)."""
    import s3fs

    place = cases.S3Place(endpoint=s3_server, bucket=f"s3://golden-{uuid.uuid4().hex[:12]}")
    s3fs.S3FileSystem(**place.storage_options).mkdir(place.bucket.removeprefix("s3://"))
    old = os.environ.get("PYTHONPATH")
    cases.ensure_worker_path()  # Ray workers must import this checkout's tswitch_ray
    try:
        yield cases.compute_all(tmp_path_factory.mktemp("golden"), place)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def test_the_same_cases_are_computed(computed):
    assert sorted(computed) == sorted(GOLDEN), (
        f"cases missing from the run: {sorted(set(GOLDEN) - set(computed))}; "
        f"cases not in {GOLDEN_FILE.name}: {sorted(set(computed) - set(GOLDEN))}")


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_output_is_unchanged(computed, case):
    if case not in computed:
        pytest.fail(f"golden case {case!r} was not computed")
    here = cases.machine()
    if case.startswith(cases.TORCH_DERIVED) and here != RECORDED_ON:
        pytest.skip(f"{case}: its inputs come from torch's samplers/training, recorded on {RECORDED_ON}; "
                    f"this machine is {here} (the mixed-zoo cases still prove identity; re-record on this "
                    "machine with tests/golden/record.py to compare these too)")
    diffs = digest.differences(GOLDEN[case], computed[case], where=case)
    if diffs:
        pytest.fail(f"golden case {case!r} differs from {GOLDEN_FILE.name} (recorded before the restructure):\n  "
                    + "\n  ".join(diffs), pytrace=False)
