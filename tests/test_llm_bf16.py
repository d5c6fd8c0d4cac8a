"""bf16 LLM zoos end to end: Llama / Qwen2 / Mistral checkpoints saved sharded by transformers, tied and
untied embeddings, through build → reconstruct and merge (TA, TIES, EMR); every output stays bf16, equals the
in-memory reference and loads into its own class (a tied lm_head, absent from the files, stays tied)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from tswitch_ray.distributed.build import BuildConfig, run_build  # noqa: E402
from tswitch_ray.distributed.merge import MergeConfig, run_merge  # noqa: E402
from tswitch_ray.io.safetensors import ShardedSafetensorsReader  # noqa: E402
from tswitch_ray.methods import get_method  # noqa: E402
from tswitch_ray.methods.base import merge_in_memory  # noqa: E402
from tswitch_ray.reconstruct import reconstruct_task  # noqa: E402
from tswitch_ray.zoo import load_zoo  # noqa: E402

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
FAMILIES = {
    "llama-untied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, False),
    "llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, True),
    "qwen2-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, True),
    "mistral-untied": (transformers.MistralConfig, transformers.MistralForCausalLM, False),
}
N_TASKS = 3
ALPHA = 0.5


def _model(family: str):
    config_cls, model_cls, tied = FAMILIES[family]
    return model_cls(config_cls(**SHAPE, tie_word_embeddings=tied)).to(torch.bfloat16).eval()


def _zoo(root: Path, family: str) -> str:
    """A base and N_TASKS fine-tune-like tasks (bf16, dense small τ full of ties), saved sharded by transformers."""
    torch.manual_seed(0)
    model = _model(family)
    model.save_pretrained(str(root / "base"), max_shard_size="40KB")
    g = torch.Generator().manual_seed(1)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for t in range(N_TASKS):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_((base[name].float() + 0.003 * torch.randn(p.shape, generator=g)).to(torch.bfloat16))
        model.save_pretrained(str(root / f"t{t}"), max_shard_size="40KB")
    tasks = [{"name": f"t{t}", "uri": f"t{t}"} for t in range(N_TASKS)]
    (root / "zoo.yaml").write_text(yaml.safe_dump({"name": family, "base": "base", "tasks": tasks}))
    return str(root / "zoo.yaml")


def _load(family: str, sd: dict[str, torch.Tensor], config_from: Path, tmp: Path):
    """The model of ``sd``: strictly via load_state_dict (the tie restored as transformers does) and via
    from_pretrained on a folder of the task's config and ``sd``; returns the latter's logits."""
    tied = FAMILIES[family][2]
    assert ("lm_head.weight" in sd) is not tied
    strict = _model(family)
    strict.load_state_dict({**sd, "lm_head.weight": sd["model.embed_tokens.weight"]} if tied else sd, strict=True)
    folder = tmp / "hf"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    shutil.copy(config_from / "config.json", folder / "config.json")
    from safetensors.torch import save_file
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model, info = FAMILIES[family][1].from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info
    assert model.dtype == torch.bfloat16
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in strict.state_dict().items())
    with torch.no_grad():
        return model(torch.arange(10).reshape(1, 10)).logits.float()


def _logits_of(folder: Path, family: str) -> torch.Tensor:
    model = FAMILIES[family][1].from_pretrained(str(folder))
    with torch.no_grad():
        return model(torch.arange(10).reshape(1, 10)).logits.float()


def _states(zoo_uri: str) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    zoo = load_zoo(zoo_uri)
    names = list(zoo.tensor_infos())
    return ({n: zoo.base.read(n) for n in names}, [{n: zoo.tasks[t].read(n) for n in names} for t in zoo.task_names])


def _check(family: str, tmp_path: Path, methods: list[tuple[str, dict]]) -> None:
    root = tmp_path / "zoo"
    zoo_uri = _zoo(root, family)
    zoo = load_zoo(zoo_uri)
    assert isinstance(zoo.base.inner, ShardedSafetensorsReader)
    assert (root / "base" / "model.safetensors.index.json").exists()
    assert {i.dtype for i in zoo.base.infos().values()} == {"BF16"}
    base_sd, task_sds = _states(zoo_uri)

    out = str(tmp_path / "switches")
    run_build(BuildConfig(zoo=zoo_uri, out=out, alphas=[ALPHA], executor="local", show_progress=False))
    expected = merge_in_memory(get_method("tswitch", alpha=ALPHA), base_sd, task_sds)
    base_logits = _logits_of(root / "base", family)
    for t, task in enumerate(zoo.task_names):
        path = tmp_path / f"{task}.safetensors"
        reconstruct_task(out, task, ALPHA, str(path))
        rec = load_file(str(path))
        assert list(rec) == list(base_sd)
        for name, tensor in rec.items():
            assert tensor.dtype == torch.bfloat16, name
            assert torch.equal(tensor, expected[t][name]), name
        logits = _load(family, rec, root / task, tmp_path)
        own = _logits_of(root / task, family)
        # The switch moves the model towards its task, not back to the base.
        assert (logits - own).norm() < (base_logits - own).norm()

    for method, options in methods:
        run_merge(MergeConfig(zoo=zoo_uri, method=method, options=options, out=str(tmp_path / method),
                              executor="local", show_progress=False))
        ref = merge_in_memory(get_method(method, **options), base_sd, task_sds)
        refs = ref if isinstance(ref, list) else [ref]
        files = ([tmp_path / method / f"{t}.safetensors" for t in zoo.task_names] if isinstance(ref, list)
                 else [tmp_path / method / "merged.safetensors"])
        for file, want in zip(files, refs, strict=True):
            got = load_file(str(file))
            assert list(got) == list(base_sd)
            for name in got:
                assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want[name]), (method, name)
            assert torch.isfinite(_load(family, got, root / "t0", tmp_path)).all()


MERGES = [("ta", {}), ("ties", {}), ("emr", {})]


def test_llama_untied_bf16_end_to_end(tmp_path):
    _check("llama-untied", tmp_path, MERGES)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama-tied", "qwen2-tied", "mistral-untied"])
def test_bf16_llm_families_end_to_end(family, tmp_path):
    _check(family, tmp_path, MERGES)
