"""No secret is written anywhere (issue 15): sentinel credentials through build, merge, eval, sweep and failing runs.

The CLI runs as real subprocesses (so the credentials are in its argv and its
environment, as an operator's would be) against the moto S3 server, a real
MLflow server and a local MLflow store, with Ray's temp folder redirected to a
folder of this test. Then every byte the runs wrote is searched for the
sentinels: the local outputs and work folders, every object of every bucket,
the MLflow server's store (database, artifacts, log), Ray's session folders
(logs of the GCS, raylet, drivers and workers), and each run's stdout and
stderr. Parquet files are searched decoded too (their pages are compressed).
moto accepts any credentials, so the sentinels work as real ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

CLI_KEY = "SENTINELKEY123"
CLI_SECRET = "SENTINELSECRET456"
ENV_SECRET = "SENTINELENVSECRET789"
ENV_SESSION = "SENTINELENVSESSION135"
MLFLOW_TOKEN = "SENTINELMLFLOWTOKEN321"
MLFLOW_PASSWORD = "SENTINELMLFLOWPASS654"
URI_PASSWORD = "SENTINELURIPASS987"
SENTINELS = (CLI_KEY, CLI_SECRET, ENV_SECRET, ENV_SESSION, MLFLOW_TOKEN, MLFLOW_PASSWORD, URI_PASSWORD)

ROOT = Path(__file__).resolve().parents[1]


def _leaks(name: str, data: bytes) -> list[str]:
    return [f"{s} in {name}" for s in SENTINELS if s.encode() in data]


def _decoded(data: bytes) -> bytes:
    """The values of a Parquet file as text (its pages are compressed, so its raw bytes would hide a secret)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(data))
    return (str(table.schema.metadata) + str(table.to_pylist())).encode()


def _search(name: str, data: bytes) -> list[str]:
    return _leaks(name, data) + (_leaks(f"{name} (decoded)", _decoded(data)) if name.endswith(".parquet") else [])


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path


def _search_folder(root: Path) -> tuple[int, list[str]]:
    files = list(_files(root))
    return len(files), [leak for path in files for leak in _search(str(path), path.read_bytes())]


def _search_buckets(endpoint: str) -> tuple[list[str], list[str]]:
    """Every object of every bucket on the S3 server, searched."""
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
    keys = [k for bucket in fs.ls("") for k in fs.find(bucket)]
    return keys, [leak for key in keys for leak in _search(f"s3://{key}", fs.cat_file(key))]


@pytest.mark.slow
def test_no_secret_is_written_anywhere(tiny_demo_zoo, s3_server, mlflow_server, tmp_path, tmp_path_factory):
    import s3fs

    # --- inputs: the demo zoo in a fresh bucket, the eval and sweep configs (outside what is searched) ---
    bucket = f"s3://sec-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(bucket)
    fs.put(str(Path(tiny_demo_zoo).parent), f"{bucket}/zoo", recursive=True)
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    zoo = f"{bucket}/zoo/zoo.yaml"
    eval_cfg = inputs / "eval.yaml"
    eval_cfg.write_text(yaml.safe_dump({
        "name": "secrets-eval", "zoo": zoo, "artifacts": f"{bucket}/switches", "work_dir": str(out / "eval"),
        "limit": 16, "batch_size": 16, "tracking": {"uri": mlflow_server, "experiment": "secrets"},
        "methods": [{"method": "base"}, {"method": "ta", "options": {"scale": 0.3}}, {"method": "tswitch", "alpha": 0.6}],
    }))
    sweep_cfg = inputs / "sweep.yaml"
    sweep_cfg.write_text(yaml.safe_dump({
        "name": "secrets-sweep", "zoo": zoo, "work_dir": f"{bucket}/sweep", "limit": 16, "batch_size": 16,
        "tracking": {"uri": str(out / "mlruns"), "experiment": "secrets-sweep"},
        "methods": [{"method": "individual"}], "grid": [{"method": ["dare"], "options.p": [0.5]}],
    }))
    bad_run_cfg = inputs / "bad-run.yaml"
    bad_run_cfg.write_text(yaml.safe_dump({"zoo": zoo, "methods": [{"method": "base"}],
                                           "run": {"executor": "nope", "storage_options": f"secret={CLI_SECRET}"}}))

    # Ray's temp folder, short: its socket paths must fit in 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="tsr-", dir="/tmp"))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": ENV_SECRET,
           "AWS_SESSION_TOKEN": ENV_SESSION, "MLFLOW_TRACKING_TOKEN": MLFLOW_TOKEN,
           "MLFLOW_TRACKING_USERNAME": "tester", "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
           "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    creds = ["-S", f"key={CLI_KEY}", "-S", f"secret={CLI_SECRET}", "--s3-endpoint", s3_server]
    runs: list[subprocess.CompletedProcess] = []

    def tswitch(*args: str, code: int = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "tswitch_ray.cli", *args], env=env, cwd=out,
                              capture_output=True, timeout=900, check=False)
        runs.append(proc)
        assert proc.returncode == code, (args, proc.returncode, proc.stderr.decode()[-3000:])
        return proc

    try:
        ray_run = ["--executor", "ray", "--workers", "2", "-q", *creds]
        local_run = ["--executor", "local", "-q", *creds]
        tswitch("build", "--zoo", zoo, "--out", f"{bucket}/switches", "--alpha", "0.6", "--alpha", "0.9", *ray_run)
        tswitch("merge", "--zoo", zoo, "--method", "ties", "--out", f"{bucket}/merged", *local_run)
        tswitch("eval", str(eval_cfg), *ray_run)
        tswitch("sweep", str(sweep_cfg), *local_run)
        # Failing runs: a missing bucket, a bad option, a tracking URI with a password that does not answer,
        # an eval config whose `run:` is invalid.
        failures = [
            tswitch("build", "--zoo", zoo, "--out", "s3://no-such-bucket-sec/switches", *local_run, code=2),
            tswitch("merge", "--zoo", zoo, "--method", "ta", "--out", str(out / "m"), "--workers", "0", *local_run,
                    code=2),
            tswitch("eval", str(eval_cfg), "--tracking-uri", f"http://tester:{URI_PASSWORD}@127.0.0.1:9",
                    "--work-dir", str(out / "eval-unreachable"), *local_run, code=2),
            tswitch("eval", str(bad_run_cfg), "-q", code=2),  # no run flag: the config's own `run:` is used
        ]
        for proc in failures:
            assert proc.stderr.decode().startswith("error:"), proc.stderr.decode()
        assert "127.0.0.1:9" in failures[2].stderr.decode()  # the URI is named, its password is not

        # --- what the runs wrote exists (so the search below is not vacuous) ---
        keys, bucket_leaks = _search_buckets(s3_server)
        assert any(k.endswith("switches/manifest.json") for k in keys)
        assert any(k.endswith("merged/merge.json") for k in keys)
        assert any(k.endswith("sweep/results.parquet") for k in keys)
        # The server fixture keeps its store in <mlflow*>/attempt-<n>/ (one folder per start attempt).
        mlflow_roots = sorted({db.parent.resolve() for db in tmp_path_factory.getbasetemp().glob("mlflow*/**/mlflow.db")})
        assert mlflow_roots, "the MLflow server's store was not found"
        sessions = list(ray_tmp.glob("ray/session_*/logs"))
        assert sessions and any(_files(s) for s in sessions), f"no Ray session logs under {ray_tmp}"

        # --- the search ---
        leaks = list(bucket_leaks)
        n_out, found = _search_folder(out)
        leaks += found
        for root in mlflow_roots:
            leaks += _search_folder(root)[1]
        n_ray, found = _search_folder(ray_tmp)
        leaks += found
        for i, proc in enumerate(runs):
            leaks += _leaks(f"stdout of run {i} ({proc.args[3]})", proc.stdout)
            leaks += _leaks(f"stderr of run {i} ({proc.args[3]})", proc.stderr)
        assert n_out > 10 and n_ray > 10 and len(keys) > 10
        assert not leaks, "\n".join(leaks)
        config = (out / "eval" / "config.json").read_text()  # the credentials reached the config, redacted
        assert '"key": "***"' in config and '"secret": "***"' in config, config
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
