"""docs/EVAL.md's worked example runs as written: its files and commands are taken out of the page.

The example's Python writes a real BERT zoo with transformers (``save_pretrained``)
and its eval data; its ``tswitch`` commands build and evaluate it; the
``individual`` row must equal what ``from_pretrained`` of each task folder gives
on the same Parquet rows. A model type the adapter does not take is refused
before any merge runs.
"""

from __future__ import annotations

import json
import re
import runpy
import shlex
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from tswitch_ray.cli import app

DOC = Path(__file__).resolve().parent.parent / "docs" / "EVAL.md"
_BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _blocks() -> tuple[dict[str, str], list[list[str]]]:
    """The page's files (blocks tagged ``file=NAME``) and its ``$ tswitch ...`` commands, in order."""
    files, commands = {}, []
    for lang, info, body in _BLOCK.findall(DOC.read_text()):
        m = re.search(r"file=(\S+)", info)
        if m:
            files[m.group(1)] = body
        elif lang == "console":
            commands += [shlex.split(line[2:]) for line in body.splitlines() if line.startswith("$ tswitch ")]
    return files, commands


def _accuracy(folder: Path, data: Path) -> float:
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(str(folder)).eval()
    table = pq.read_table(str(data))
    ids = torch.tensor(table.column("input_ids").to_pylist())
    labels = torch.tensor(table.column("label").to_pylist())
    with torch.no_grad():
        pred = model(input_ids=ids, attention_mask=(ids != model.config.pad_token_id).long()).logits.argmax(-1)
    return float((pred == labels).float().mean())


@pytest.mark.slow
def test_eval_md_worked_example_runs(tmp_path, monkeypatch):
    files, commands = _blocks()
    assert set(files) == {"make_zoo.py", "zoo.yaml", "eval.yaml"}
    assert [c[:2] for c in commands] == [["tswitch", "build"], ["tswitch", "eval"]]
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    monkeypatch.chdir(tmp_path)
    runpy.run_path("make_zoo.py", run_name="__main__")
    for cmd in commands:
        r = CliRunner().invoke(app, cmd[1:])
        assert r.exit_code == 0, r.output

    work = tmp_path / "runs" / "tiny-bert"
    assert {"results.md", "results.csv", "results.parquet", "summary.json"} <= {p.name for p in work.iterdir()}
    summary = {s["method"]: s for s in json.loads((work / "summary.json").read_text())}
    assert set(summary) == {"individual", "ta", "ties", "tswitch"}
    for task in ("mod2", "mod3"):
        expected = _accuracy(tmp_path / task, tmp_path / "data" / f"{task}.parquet")
        assert summary["individual"]["per_task"][task] == pytest.approx(expected, abs=1e-9)
        assert all(0 <= summary[m]["per_task"][task] <= 1 for m in summary)
    assert summary["individual"]["per_task"]["mod2"] > 0.75  # the fine-tune learned something: not a chance-level check

    # The same zoo under the image adapter: refused before any merge, naming the config.json and the type.
    cfg = yaml.safe_load(files["eval.yaml"])
    cfg.update(work_dir="runs/wrong", adapter={**cfg["adapter"], "kind": "hf_image_classifier"})
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["eval", "wrong.yaml", "--no-tracking", "--quiet"])
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "base/config.json: model_type 'bert' is not supported by the 'hf_image_classifier' adapter" in text
    assert "supported model types:" in text and "vit" in text
    assert not (tmp_path / "runs" / "wrong" / "merges").exists()
