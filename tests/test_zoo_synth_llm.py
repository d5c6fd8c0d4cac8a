"""`tswitch zoo synth --arch llama-*`: Llama-shaped bf16 zoos that transformers loads as LlamaForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from tswitch_ray.cli import app  # noqa: E402
from tswitch_ray.errors import ConfigError  # noqa: E402
from tswitch_ray.zoo import load_zoo, synth_zoo  # noqa: E402
from tswitch_ray.zoo.synth_llm import llama_config, llama_layout, llm_settings  # noqa: E402


def _meta_model(cfg: dict):
    """The real model of a preset, on the meta device (no memory), for its state dict's names and shapes."""
    config = transformers.LlamaConfig(**{k: v for k, v in llama_config(cfg, torch.bfloat16).items()
                                         if k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("arch,layers", [("llama-1b", 2), ("llama-8b-embed", None), ("llama-tiny", None)])
@pytest.mark.parametrize("tied", [None, True, False])
def test_layout_is_the_models_state_dict(arch, layers, tied):
    cfg = llm_settings(arch, layers, tied)
    model = _meta_model(cfg)
    expected = [(n, tuple(t.shape)) for n, t in model.state_dict().items()]
    if cfg["tied"]:  # save_pretrained drops the tied copy
        expected = [(n, s) for n, s in expected if n != "lm_head.weight"]
    assert llama_layout(cfg) == expected


def test_presets_have_the_real_models_shapes():
    b1 = dict(llama_layout(llm_settings("llama-1b")))
    assert b1["model.embed_tokens.weight"] == (128256, 2048)
    assert b1["model.layers.15.self_attn.k_proj.weight"] == (512, 2048)  # GQA: 8 of 32 heads of 64
    assert b1["model.layers.15.mlp.down_proj.weight"] == (2048, 8192)
    assert "lm_head.weight" not in b1 and "model.layers.16.mlp.up_proj.weight" not in b1
    b8 = dict(llama_layout(llm_settings("llama-8b-embed")))
    assert b8["lm_head.weight"] == b8["model.embed_tokens.weight"] == (128256, 4096)
    assert b8["model.layers.1.mlp.gate_proj.weight"] == (14336, 4096)
    assert "model.layers.2.mlp.gate_proj.weight" not in b8
    with pytest.raises(ConfigError, match="between 0 and 16"):
        llm_settings("llama-1b", 17)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_synth")
    # Small shards: the tiny model (~110 KiB in bf16) spans several files and an index.
    return synth_zoo("llama-tiny", 2, "bf16", str(root / "zoo"), seed=3, shard_bytes=40_000), root


def test_tiny_zoo_loads_into_llama(tiny):
    manifest, root = tiny
    zoo = load_zoo(manifest)
    zoo.validate()
    assert zoo.task_names == ["task_01", "task_02"]
    folder = root / "zoo" / "base"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in zoo.base.infos().values())
    logits = []
    for which in ["base", *zoo.task_names]:
        model, info = transformers.LlamaForCausalLM.from_pretrained(str(root / "zoo" / which),
                                                                    output_loading_info=True)
        assert not any(info.values()), info  # no missing, unexpected or mismatched keys
        assert model.dtype == torch.bfloat16 and model.config.num_key_value_heads == 2
        with torch.no_grad():
            logits.append(model(torch.arange(8).reshape(1, 8)).logits.float())
        assert torch.isfinite(logits[-1]).all()
    assert not torch.equal(logits[0], logits[1]) and not torch.equal(logits[1], logits[2])


def test_task_vectors_are_low_rank_plus_sparse(tiny):
    manifest, _ = tiny
    zoo = load_zoo(manifest)
    name = "model.layers.1.mlp.up_proj.weight"
    base = zoo.base.read(name).float()
    tau = zoo.tasks["task_01"].read(name).float() - base
    assert zoo.base.read(name).dtype == torch.bfloat16
    s = torch.linalg.svdvals(tau)
    # Most of the energy in the 8 leading directions; the sparse part and bf16 rounding make the rest.
    assert (s[:8] ** 2).sum() / (s**2).sum() > 0.6
    assert 1e-4 < tau.abs().median() < 1e-2
    other = zoo.tasks["task_02"].read(name).float() - base
    assert torch.corrcoef(torch.stack([tau.flatten(), other.flatten()]))[0, 1].abs() < 0.2


def test_cut_zoo_holds_the_full_zoos_tensors(tiny, tmp_path):
    manifest, root = tiny
    cut = synth_zoo("llama-tiny", 1, "bf16", str(tmp_path / "cut"), seed=3, layers=1)
    full, short = load_zoo(manifest), load_zoo(cut)
    assert (tmp_path / "cut" / "base" / "model.safetensors").exists()  # one shard: no index
    assert "model.layers.1.mlp.up_proj.weight" not in short.base.infos()
    for name in short.base.infos():
        assert torch.equal(short.base.read(name), full.base.read(name)), name
        assert torch.equal(short.tasks["task_01"].read(name), full.tasks["task_01"].read(name)), name


def test_cli_zoo_synth_llama(tmp_path):
    res = CliRunner().invoke(app, ["zoo", "synth", "--arch", "llama-tiny", "--tasks", "1", "--tied",
                                   "--out", str(tmp_path / "z")])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load((tmp_path / "z" / "zoo.yaml").read_text())
    assert data["base"] == "base" and data["tasks"] == [{"name": "task_01", "uri": "task_01"}]
    sd = load_file(str(tmp_path / "z" / "base" / "model.safetensors"))
    assert "lm_head.weight" not in sd and all(t.dtype == torch.bfloat16 for t in sd.values())
    config = json.loads((tmp_path / "z" / "task_01" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "bfloat16"
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "z" / "task_01"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    bad = CliRunner().invoke(app, ["zoo", "synth", "--arch", "vit-b-32", "--tied", "--out", str(tmp_path / "v")])
    assert bad.exit_code == 2 and "LLM architectures" in bad.output

