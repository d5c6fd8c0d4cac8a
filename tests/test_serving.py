"""Fast decode and serving: the compiled decoder and one-pass θ0 + λ·M⊙S give the tensor path's bytes, and
SwitchServer's apply / switch_to give exactly what `tswitch reconstruct` writes (paper 000 eq. 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tswitch_ray.artifacts.encoding import decode_positions, decode_switch, encode_switch, torch_positions
from tswitch_ray.errors import ConfigError
from tswitch_ray.reconstruct import reconstruct_task
from tswitch_ray.serving import SwitchServer
from tswitch_ray.switch import reconstruct, reconstruct_into

from test_build_reconstruct import TASKS, build_args, cli, make_state, write_zoo

SPECIAL = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -1e-40, 3e38, -3e38, 65504.0, 1e-8, -2.5]


def _numpy_reference_decode(enc) -> tuple[np.ndarray, np.ndarray]:
    """The codec read with NumPy array operations alone (docs/ARTIFACTS.md "Codec"), for comparison."""
    unary = np.unpackbits(np.frombuffer(enc.mask_bits, dtype=np.uint8))
    term = np.flatnonzero(unary)
    quot = np.diff(term, prepend=-1) - 1
    rem = np.zeros(term.size, dtype=np.int64)
    if enc.k:
        bits = np.unpackbits(np.frombuffer(enc.rem_bits, dtype=np.uint8), count=term.size * enc.k)
        rem = bits.reshape(-1, enc.k) @ (1 << np.arange(enc.k - 1, -1, -1, dtype=np.int64))
    pos = np.cumsum((quot << enc.k) + rem + 1) - 1
    coded = np.zeros(enc.numel, dtype=bool)
    coded[pos] = True
    mask = ~coded if enc.inverted else coded
    positive = np.zeros(enc.numel, dtype=bool)
    positive[np.flatnonzero(mask)] = np.unpackbits(np.frombuffer(enc.sign_bits, dtype=np.uint8), count=enc.kept)
    return mask, positive


@pytest.mark.parametrize("keep", [0.0, 0.03, 0.4, 0.5, 0.51, 0.9, 1.0])
def test_compiled_decode_equals_numpy_reference(keep):
    rng = np.random.default_rng(int(keep * 100))
    n = 50_001
    mask = rng.random(n) < keep
    mask[:300] = rng.random(300) < 0.98  # a dense run: long runs of the minority value, wide quotients
    enc = encode_switch(mask, rng.random(n) < 0.5)
    got = decode_switch(enc)
    want = _numpy_reference_decode(enc)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert np.array_equal(got[0], mask)
    # the vectorised torch decoder (the CUDA path), run here on the CPU
    assert np.array_equal(torch_positions(enc, torch.device("cpu")).numpy(), decode_positions(enc).positions())


def _theta(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    t = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.02
    t[: len(SPECIAL)] = torch.tensor(SPECIAL)
    return t.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("keep", [0.0, 0.3, 0.8, 1.0])
def test_one_pass_reconstruct_is_the_tensor_path_bit_for_bit(dtype, keep):
    rng = np.random.default_rng(3)
    n = 20_011
    theta = _theta(dtype, n, seed=1).reshape(20011)
    mask = rng.random(n) < keep
    mask[: len(SPECIAL)] = True  # NaN, ±inf, ±0 and subnormals are kept and summed
    positive = rng.random(n) < 0.5
    dec = decode_positions(encode_switch(mask, positive))
    dec = type(dec)(dec.enc, block=997)  # several blocks per tensor, one ending mid-run
    lam = 0.01234567891
    want = reconstruct(theta, torch.from_numpy(mask), torch.from_numpy(positive & mask), lam)
    got = reconstruct_into(theta, dec, lam)
    assert got.dtype == dtype and torch.equal(_bits(got), _bits(want))
    inplace = theta.clone()
    reconstruct_into(inplace, dec, lam, out=inplace)
    assert torch.equal(_bits(inplace), _bits(want))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    states = make_state(seed=11)
    zoo = write_zoo(tmp / "zoo", states, "safetensors")
    out = tmp / "switches"
    r = cli(*build_args(zoo, out, "tensor", "rms"))
    assert r.exit_code == 0, r.output
    return zoo, out, states, tmp


def _module_like(state: dict[str, torch.Tensor]) -> nn.Module:
    root = nn.Module()
    for name, t in state.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        if t.is_floating_point():
            mod.register_parameter(leaf, nn.Parameter(torch.zeros_like(t), requires_grad=False))
        else:
            mod.register_buffer(leaf, torch.zeros_like(t))
    return root


def test_server_apply_and_switch_to_give_the_reconstructed_file(built):
    zoo, out, states, tmp = built
    server = SwitchServer(str(out), str(zoo), device="cpu")
    module = _module_like(states["base"])
    for task in TASKS:
        for alpha in (0.5, 0.9):
            path = reconstruct_task(str(out), task, alpha, str(tmp / f"{task}-{alpha}.safetensors"))
            ref = load_file(path)  # the safetensors package's own reader
            sd = server.apply(task, alpha)
            assert list(sd) == list(ref)
            server.switch_to(module, task, alpha)
            live = {**dict(module.named_parameters()), **dict(module.named_buffers())}
            for name, want in ref.items():
                assert torch.equal(_bits(sd[name]) if want.is_floating_point() else sd[name],
                                   _bits(want) if want.is_floating_point() else want), name
                assert torch.equal(live[name].detach(), want) or torch.equal(_bits(live[name].detach()), _bits(want)), name
            assert not torch.equal(sd["embed.weight"], states["base"]["embed.weight"])  # the switch did something
    server.switch_to(module, None)  # back to θ0
    for name, want in states["base"].items():
        got = dict(module.named_parameters()).get(name, dict(module.named_buffers()).get(name))
        assert torch.equal(got.detach(), want), name


def test_server_reads_each_task_once_and_names_bad_modules(built):
    zoo, out, states, _ = built
    server = SwitchServer(str(out), str(zoo), device="cpu")
    first = server.switches(TASKS[0], 0.5)
    assert server.switches(TASKS[0], 0.5) is first  # cached encoded, not read again
    assert sum(sw.enc.nbytes for sw in first.values()) < sum(t.numel() * t.element_size() for t in states["base"].values())
    with pytest.raises(ConfigError, match="alpha|α"):
        server.apply(TASKS[0])  # three α were built: name one
    with pytest.raises(ConfigError, match="no entry"):
        server.switch_to(nn.Linear(2, 2), TASKS[0], 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_server_on_cuda_gives_the_cpu_bytes(built):
    zoo, out, _, _ = built
    cpu = SwitchServer(str(out), str(zoo), device="cpu").apply(TASKS[1], 0.5)
    gpu = SwitchServer(str(out), str(zoo), device="cuda").apply(TASKS[1], 0.5)
    for name, want in cpu.items():
        have = gpu[name].cpu()
        assert torch.equal(_bits(have) if want.is_floating_point() else have,
                           _bits(want) if want.is_floating_point() else want), name
