"""PEFT LoRA adapter folders as zoo tasks: τ = s · B·A read directly, checked against peft's own merge.

Every adapter here is written by peft (get_peft_model on a tiny transformers
model, seeded non-zero lora_B, save_pretrained); the reference τ is peft's
``merge_and_unload()`` minus the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tswitch_ray.distributed.build import BuildConfig, run_build  # noqa: E402
from tswitch_ray.distributed.merge import MergeConfig, run_merge  # noqa: E402
from tswitch_ray.errors import ZooError  # noqa: E402
from tswitch_ray.eval.weights import read_checkpoint  # noqa: E402
from tswitch_ray.io.peft import PeftAdapterReader  # noqa: E402
from tswitch_ray.io.readers import open_checkpoint, open_task  # noqa: E402
from tswitch_ray.reconstruct import reconstruct_task  # noqa: E402
from tswitch_ray.zoo import load_zoo  # noqa: E402
from tswitch_ray.zoo.taskvectors import read_task_vector  # noqa: E402

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def _seed_lora(model, seed: int) -> None:
    """LoRA initialises B = 0 (τ = 0); give every factor seeded values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(0.01 * torch.randn(p.shape, generator=g))


def _adapter(base_dir: Path, out: Path, seed: int, config, model_fn=_llama, safe: bool = True):
    """Write a peft adapter for the model saved in ``base_dir``; returns peft's merged state dict (the reference)."""
    model = model_fn()
    model.load_state_dict(load_file(str(base_dir / "model.safetensors")), strict=False)
    pm = peft.get_peft_model(model, config)
    _seed_lora(pm, seed)
    pm.save_pretrained(str(out), safe_serialization=safe)
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def llama_zoo(tmp_path_factory):
    """A base LlamaForCausalLM (untied, fp32) and three adapters: plain LoRA, rsLoRA with an alpha_pattern and
    LoRA on the embedding with lm_head in modules_to_save."""
    root = tmp_path_factory.mktemp("peft_zoo")
    _llama().save_pretrained(str(root / "base"))
    lc = peft.LoraConfig
    configs = {
        "plain": lc(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "rslora": lc(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                     alpha_pattern={"o_proj": 16}),
        "embed": lc(r=3, lora_alpha=6, target_modules=["embed_tokens", "gate_proj"], modules_to_save=["lm_head"]),
    }
    merged = {name: _adapter(root / "base", root / name, i + 1, cfg) for i, (name, cfg) in enumerate(configs.items())}
    manifest = {"name": "lora", "base": "base", "tasks": [{"name": n, "uri": n} for n in configs]}
    (root / "zoo.yaml").write_text(yaml.safe_dump(manifest))
    return root, merged


def _base(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "base" / "model.safetensors"))


def test_adapter_tau_equals_peft_merge(llama_zoo):
    root, merged = llama_zoo
    base = _base(root)
    zoo = load_zoo(str(root / "zoo.yaml"))
    zoo.validate()
    for task in zoo.task_names:
        reader = zoo.tasks[task]
        assert isinstance(reader.inner, PeftAdapterReader)  # seen by the zoo through its key layout
        changed = 0
        for name, theta0 in base.items():
            tau = read_task_vector(reader, name, theta0)
            assert tau.dtype == torch.float32 and tau.shape == theta0.shape
            expected = merged[task][name] - theta0
            if not expected.any():
                assert not tau.any(), f"{task}:{name} is untouched, so its τ must be exactly 0"
                continue
            changed += 1
            torch.testing.assert_close(tau, expected, rtol=1e-5, atol=1e-6, msg=f"{task}:{name}")
            # The dense weight (the task itself, e.g. for its Individual score) is peft's merge.
            torch.testing.assert_close(reader.read(name), merged[task][name], rtol=1e-5, atol=1e-6)
        assert changed >= 4, task
    # lm_head is a whole replacement (modules_to_save), embed_tokens base_layer + s·BA.
    assert set(zoo.tasks["embed"].plan.replaced) == {"lm_head.weight"}
    assert "model.embed_tokens.weight" in zoo.tasks["embed"].plan.lora
    assert zoo.tasks["rslora"].plan.lora["model.layers.0.self_attn.o_proj.weight"].alpha == 16


def test_adapter_tau_is_exact_not_rounded(llama_zoo):
    """τ is s·B·A in fp32 itself, not (θ0 + s·B·A) rounded and θ0 subtracted again."""
    root, _ = llama_zoo
    reader = open_task(str(root / "plain"), open_checkpoint(str(root / "base")))
    w = load_file(str(root / "plain" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_"
    exact = (w[key + "B.weight"] @ w[key + "A.weight"]) * (8 / 4)
    tau = reader.task_vector("model.layers.1.mlp.down_proj.weight", torch.zeros(exact.shape, dtype=torch.bfloat16))
    assert torch.equal(tau, exact)


class _Recording:
    """A reader of the adapter file that records each tensor it is asked for."""

    def __init__(self, inner):
        self.inner, self.uri, self.reads = inner, inner.uri, []

    def infos(self):
        return self.inner.infos()

    def read(self, name):
        self.reads.append(name)
        return self.inner.read(name)


def test_adapter_reads_one_module_at_a_time(llama_zoo):
    root, _ = llama_zoo
    base_reader = open_checkpoint(str(root / "base"))
    weights = _Recording(open_checkpoint(str(root / "rslora" / "adapter_model.safetensors")))
    reader = PeftAdapterReader(str(root / "rslora"), base_reader, weights=weights)
    reader.infos()
    assert weights.reads == []  # headers only
    for name in base_reader.infos():
        weights.reads.clear()
        reader.task_vector(name, base_reader.read(name))
        module = name.removesuffix(".weight")
        if name in reader.plan.lora:
            assert sorted(weights.reads) == [f"base_model.model.{module}.lora_A.weight",
                                             f"base_model.model.{module}.lora_B.weight"]
        else:
            assert weights.reads == []
    # No tensor is kept between calls: the reader's state is headers and the plan.
    held = [v for v in vars(reader).values() if isinstance(v, torch.Tensor)]
    assert held == []


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=80, n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_fan_in_fan_out_and_bin_adapter(tmp_path):
    """GPT-2's Conv1D stores weights (in × out): fan_in_fan_out transposes B·A. The adapter is a .bin file."""
    _gpt2().save_pretrained(str(tmp_path / "base"))
    cfg = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    merged = _adapter(tmp_path / "base", tmp_path / "ad", 7, cfg, model_fn=_gpt2, safe=False)
    assert (tmp_path / "ad" / "adapter_model.bin").exists()
    base_reader = open_checkpoint(str(tmp_path / "base"))
    reader = open_task(str(tmp_path / "ad"), base_reader)
    assert isinstance(reader, PeftAdapterReader)
    assert len(reader.plan.lora) == 6  # c_attn, attn.c_proj and mlp.c_proj of 2 blocks
    for name in base_reader.infos():
        theta0 = base_reader.read(name)
        if name in merged and theta0.is_floating_point():
            torch.testing.assert_close(read_task_vector(reader, name, theta0), merged[name] - theta0,
                                       rtol=1e-5, atol=1e-6)


def test_unsupported_adapters_are_refused(llama_zoo, tmp_path):
    root, _ = llama_zoo
    base = open_checkpoint(str(root / "base"))
    # DoRA: written by peft, refused from its config.
    _adapter(root / "base", tmp_path / "dora", 3, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"],
                                                                  use_dora=True))
    with pytest.raises(ZooError, match="DoRA adapter"):
        open_task(str(tmp_path / "dora"), base).infos()
    # Another PEFT type.
    _adapter(root / "base", tmp_path / "ia3", 3, peft.IA3Config(target_modules=["v_proj", "down_proj"],
                                                                feedforward_modules=["down_proj"]))
    with pytest.raises(ZooError, match="only LoRA adapters"):
        open_task(str(tmp_path / "ia3"), base).infos()
    # An adapter of another model: the error names the tensor and both shapes.
    def wide():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, "hidden_size": 48})).eval()
    wide().save_pretrained(str(tmp_path / "wide"))
    _adapter(tmp_path / "wide", tmp_path / "other", 3, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]),
             model_fn=wide)
    with pytest.raises(ZooError, match=r"q_proj\.weight.*\[32, 32\]"):
        open_task(str(tmp_path / "other"), base).infos()
    # PiSSA-style inits rewrite W0 as well: s·B·A alone is not the update on this base.
    import shutil
    shutil.copytree(root / "plain", tmp_path / "pissa")
    cfg = json.loads((tmp_path / "pissa" / "adapter_config.json").read_text())
    (tmp_path / "pissa" / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(ZooError, match="changes the base weights too"):
        open_task(str(tmp_path / "pissa"), base).infos()
    # An adapter folder without weights.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    with pytest.raises(ZooError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        open_task(str(tmp_path / "empty"), base).infos()


def _logits(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    model = _llama()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model(torch.arange(12).reshape(1, 12)).logits


@pytest.mark.slow
def test_adapter_zoo_build_merge_reconstruct_eval(llama_zoo, tmp_path):
    root, merged = llama_zoo
    zoo_uri = str(root / "zoo.yaml")
    base = _base(root)
    # eval's Individual weights: the adapter task, dense, gives peft's merged model's logits.
    zoo = load_zoo(zoo_uri)
    for task in zoo.task_names:
        torch.testing.assert_close(_logits(read_checkpoint(zoo, task)), _logits(merged[task]), rtol=1e-4, atol=1e-5)

    for scope in ("tensor", "model"):
        out = str(tmp_path / f"sw-{scope}")
        summary = run_build(BuildConfig(zoo=zoo_uri, out=out, alphas=[0.5], scope=scope, executor="local",
                                        show_progress=False))
        assert summary.tasks == 3
        for task in zoo.task_names:
            path = str(tmp_path / f"{scope}-{task}.safetensors")
            reconstruct_task(out, task, 0.5, path)
            rec = load_file(path)
            for name, theta0 in base.items():
                delta = rec[name] - theta0
                expected = merged[task][name] - theta0
                if not expected.any():
                    assert torch.equal(rec[name], theta0), f"{task}:{name}: τ = 0, so θ0 exactly"
                else:
                    kept = delta != 0
                    assert kept.any() and torch.equal(torch.sign(delta[kept]), torch.sign(expected[kept]))
            _logits(rec)  # loads strictly into its own class

    # Task Arithmetic: θ0 + λ Σ τ, against peft's merges.
    run_merge(MergeConfig(zoo=zoo_uri, method="ta", out=str(tmp_path / "ta"), options={"scale": 0.3},
                          executor="local", show_progress=False))
    ta = load_file(str(tmp_path / "ta" / "merged.safetensors"))
    for name, theta0 in base.items():
        want = theta0 + 0.3 * sum(merged[t][name] - theta0 for t in merged)
        torch.testing.assert_close(ta[name], want, rtol=1e-5, atol=1e-6, msg=name)
    run_merge(MergeConfig(zoo=zoo_uri, method="emr", out=str(tmp_path / "emr"), executor="local",
                          show_progress=False))
    for task in merged:
        _logits(load_file(str(tmp_path / "emr" / f"{task}.safetensors")))


def test_adapter_on_bf16_base_stays_bf16(tmp_path):
    """The usual LLM case: a bf16 base, fp32 adapter factors (peft's default). τ is s·B·A in fp32, outputs are bf16."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(torch.bfloat16).save_pretrained(
        str(tmp_path / "base"))
    bf16_llama = lambda: _llama().to(torch.bfloat16)  # noqa: E731
    merged = _adapter(tmp_path / "base", tmp_path / "ad", 5, peft.LoraConfig(r=4, lora_alpha=8,
                      target_modules=["q_proj", "up_proj"]), model_fn=bf16_llama)
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({"name": "bf", "base": "base",
                                                        "tasks": [{"name": "ad", "uri": "ad"}]}))
    zoo = load_zoo(str(tmp_path / "zoo.yaml"))
    w = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_"
    assert w[key + "A.weight"].dtype == torch.float32
    name = "model.layers.0.mlp.up_proj.weight"
    theta0 = zoo.base.read(name)
    assert theta0.dtype == torch.bfloat16
    assert torch.equal(read_task_vector(zoo.tasks["ad"], name, theta0), (w[key + "B.weight"] @ w[key + "A.weight"]) * 2)
    assert zoo.tasks["ad"].read(name).dtype == torch.bfloat16
    torch.testing.assert_close(zoo.tasks["ad"].read(name).float(), merged[name].float(), rtol=0, atol=2e-3)
    run_build(BuildConfig(zoo=str(tmp_path / "zoo.yaml"), out=str(tmp_path / "sw"), alphas=[0.5], executor="local",
                          show_progress=False))
    reconstruct_task(str(tmp_path / "sw"), "ad", 0.5, str(tmp_path / "rec.safetensors"))
    rec = load_file(str(tmp_path / "rec.safetensors"))
    assert {t.dtype for t in rec.values()} == {torch.bfloat16}
    assert torch.equal(rec["model.layers.0.self_attn.k_proj.weight"], zoo.base.read("model.layers.0.self_attn.k_proj.weight"))
    run_merge(MergeConfig(zoo=str(tmp_path / "zoo.yaml"), method="ties", out=str(tmp_path / "ties"), executor="local",
                          show_progress=False))
    ties = load_file(str(tmp_path / "ties" / "merged.safetensors"))
    assert {t.dtype for t in ties.values()} == {torch.bfloat16} and list(ties) == list(rec)


def test_cli_build_refuses_a_dora_adapter_cleanly(llama_zoo, tmp_path):
    from typer.testing import CliRunner

    from tswitch_ray.cli import app

    root, _ = llama_zoo
    _adapter(root / "base", tmp_path / "dora", 3, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"],
                                                                  use_dora=True))
    manifest = {"name": "d", "base": str(root / "base"), "tasks": [{"name": "plain", "uri": str(root / "plain")},
                                                                  {"name": "dora", "uri": "dora"}]}
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(manifest))
    res = CliRunner().invoke(app, ["build", "--zoo", str(tmp_path / "zoo.yaml"), "--out", str(tmp_path / "sw"),
                                   "--executor", "local", "--quiet"], catch_exceptions=False)
    assert res.exit_code == 2 and "Traceback" not in res.output
    flat = " ".join(res.stderr.split())
    assert flat.startswith("error:") and "DoRA adapter (use_dora: true)" in flat and str(tmp_path / "dora") in flat
    assert not list(tmp_path.rglob("manifest.json"))
