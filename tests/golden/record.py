"""Record tests/golden/golden.json from the code of this checkout.

    PYTHONPATH=. python tests/golden/record.py            # writes tests/golden/golden.json
    PYTHONPATH=. python tests/golden/record.py --out x.json

Run it only when an output is meant to change (and say so in the commit): the
golden test exists to prove that a restructure changes no output. It starts its
own S3 server (moto's, on 127.0.0.1), makes every input in a temp folder, runs
the cases of cases.py through the `tswitch` CLI and writes their digests.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `golden` as a package, as pytest sees it from tests/

from golden import cases  # noqa: E402

GOLDEN = HERE / "golden.json"
MACHINE = HERE / "machine.json"


def _dump(value: object, indent: int) -> str:
    """Nested mappings one key a line, nested lists one item a line; a flat list or mapping on one line."""
    pad = " " * indent
    nested = isinstance(value, (dict, list)) and any(
        isinstance(v, (dict, list)) for v in (value.values() if isinstance(value, dict) else value))
    if not nested:
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    if isinstance(value, dict):
        items = [f"{pad} {json.dumps(k)}: {_dump(v, indent + 1)}" for k, v in sorted(value.items())]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    items = [f"{pad} {_dump(v, indent + 1)}" for v in value]
    return "[\n" + ",\n".join(items) + f"\n{pad}]"


def dump(digests: dict) -> str:
    """The one serialisation of golden.json: one row or tensor a line, so a diff names what changed."""
    return _dump(digests, 0) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=GOLDEN)
    args = parser.parse_args()
    cases.ensure_worker_path()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[key] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"

    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    t0 = time.perf_counter()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        place = cases.S3Place(endpoint=endpoint, bucket=f"s3://golden-{uuid.uuid4().hex[:12]}")
        s3fs.S3FileSystem(**place.storage_options).mkdir(place.bucket.removeprefix("s3://"))
        with tempfile.TemporaryDirectory(prefix="tswitch-golden-") as tmp:
            digests = cases.compute_all(Path(tmp), place, say=lambda m: print(f"{time.perf_counter() - t0:6.1f} s  {m}"))
    finally:
        server.stop()
    args.out.write_text(dump(digests), encoding="utf-8")
    (args.out.parent / MACHINE.name).write_text(json.dumps(cases.machine(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(digests)} cases in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
