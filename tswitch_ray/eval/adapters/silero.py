"""Silero VAD: a real pretrained network that ships inside a PyPI wheel, as a classification backbone.

The ``silero-vad`` package (MIT) ships its 16 kHz voice-activity model as
``silero_vad/data/silero_vad_16k.safetensors`` — plain tensors, nothing to
unpickle — so a zoo fine-tuned from it is a zoo of real pretrained weights
that no hub is needed for. The architecture (the package's own
``tinygrad_model.py`` transcribed to torch): a fixed-size STFT as a 1-D
convolution (n_fft 256, hop 128) → magnitude → four 1-D convolutions with
ReLU (the *encoder*) → an LSTM cell → ReLU → a 1×1 convolution and a sigmoid
(the speech probability). One input chunk is 576 samples (512 + the 64-sample
context the package prepends), which the encoder reduces to one time step.

As a backbone, the pre-classifier features are ReLU(h), the LSTM's hidden
state (128 values); each task has a :class:`~.heads.LinearHead` on them
(``heads/<task>.safetensors``). Checkpoint keys are the package's own
(``stft_conv.weight``, ``conv1.weight`` … ``conv4.bias``, ``lstm_cell.*``,
``final_conv.*``); the module keeps the four convolutions in an
:class:`SileroEncoder` that takes frames as tokens ``[B, T, 129]``, which is
what WEMoE upscales (``SileroVAD.MLP_PATHS``).

Inputs are images read as signals (:func:`signals_from_images`): the
grayscale pixels of a 24×24 image in row-major order are 576 samples, scaled
to [-1, 1] and centred, the way audio reaches the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from tswitch_ray.errors import ConfigError
from tswitch_ray.eval.adapters.base import AdapterBase
from tswitch_ray.eval.adapters.heads import load_heads_dir
from tswitch_ray.eval.adapters.preprocess import Preprocess, _resize_and_crop

N_FFT, HOP, PAD = 256, 128, 64
N_BINS = N_FFT // 2 + 1
CHUNK = 576  # 512 samples + the 64-sample context the package prepends: one encoder step
SIDE = 24  # a 24x24 image read row by row is one chunk
CONV_KEYS = ("conv1", "conv2", "conv3", "conv4")


def packaged_weights_path() -> str:
    """Where the installed ``silero-vad`` wheel keeps its safetensors weights."""
    try:
        return str(resources.files("silero_vad") / "data" / "silero_vad_16k.safetensors")
    except ModuleNotFoundError as e:
        raise ConfigError("the real-model zoo needs the silero-vad package (pip install 'tswitch-ray[real]').") from e


class SileroEncoder(nn.Module):
    """The four convolutions, on frames as tokens: ``[B, T, 129]`` (or ``[T, 129]``) -> ``[B, T/4, 128]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(N_BINS, 128, kernel_size=3, stride=1, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, stride=1, padding=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        single = tokens.ndim == 2  # WEMoE calls it per example under vmap
        x = (tokens.unsqueeze(0) if single else tokens).transpose(1, 2)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.relu(conv(x))
        x = x.transpose(1, 2)
        return x[0] if single else x


class SileroVAD(nn.Module):
    """Silero VAD v5 (16 kHz); ``features`` is ReLU of the LSTM state after the chunk's frames."""

    MLP_PATHS = ("encoder",)  # what WEMoE upscales (eval/wemoe_eval.find_mlp_paths)

    def __init__(self) -> None:
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 2 * N_BINS, kernel_size=N_FFT, stride=HOP, bias=False)
        self.encoder = SileroEncoder()
        self.lstm_cell = nn.LSTMCell(128, 128)
        self.final_conv = nn.Conv1d(128, 1, 1)

    def spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` samples -> ``[B, T, 129]`` STFT magnitudes (frames as tokens)."""
        z = self.stft_conv(F.pad(x, (0, PAD), mode="reflect").unsqueeze(1))
        # clamp: sqrt's gradient at 0 is infinite, and fine-tuning goes through here
        mag = (z[:, :N_BINS] ** 2 + z[:, N_BINS:] ** 2).clamp_min(1e-12).sqrt()
        return mag.transpose(1, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder(self.spectrum(x))
        h = enc.new_zeros(enc.shape[0], 128)
        c = enc.new_zeros(enc.shape[0], 128)
        for t in range(enc.shape[1]):
            h, c = self.lstm_cell(enc[:, t], (h, c))
        return F.relu(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pretrained model's own output: the speech probability of each chunk, ``[B]``."""
        return torch.sigmoid(self.final_conv(self.features(x).unsqueeze(-1)))[:, 0, 0]


def checkpoint_to_module_key(key: str) -> str:
    """The package's key (``conv1.weight``) -> this module's (``encoder.conv1.weight``)."""
    return f"encoder.{key}" if key.split(".", 1)[0] in CONV_KEYS else key


def module_to_checkpoint_key(key: str) -> str:
    return key.removeprefix("encoder.")


def checkpoint_state(model: SileroVAD) -> dict[str, torch.Tensor]:
    """The module's weights in the package's key layout (what the zoo's files hold)."""
    return {module_to_checkpoint_key(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def signals_from_images(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, S, S, 3]`` (or ``[N, S, S]``) -> float32 ``[N, S*S]``: grayscale, row-major, in [-1, 1], centred."""
    a = np.asarray(images, dtype=np.float32)
    if a.ndim == 4:
        a = a @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as PIL's convert("L")
    x = torch.from_numpy(np.ascontiguousarray(a.reshape(a.shape[0], -1))) / 127.5 - 1.0
    return x - x.mean(dim=1, keepdim=True)


@dataclass
class SileroVADAdapter(AdapterBase):
    """Silero VAD backbone + per-task :class:`LinearHead` s on its 128 features."""

    kind: str = "silero_vad"

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess("image", SIDE)

    def template(self) -> nn.Module:
        return SileroVAD()

    def load(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        return self._load_strict(model, {checkpoint_to_module_key(k): v for k, v in state_dict.items()}, "")

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.features(x)

    def collate(self, items: Sequence[Image.Image]) -> torch.Tensor:
        arrs = [np.asarray(_resize_and_crop(img, SIDE).convert("RGB"), dtype=np.uint8) for img in items]
        if not arrs:
            return torch.empty((0, SIDE * SIDE), dtype=torch.float32)
        return signals_from_images(np.stack(arrs))

    @classmethod
    def from_heads_dir(cls, heads_uri: str, tasks: Sequence[str] | None = None, storage_options: Mapping[str, Any] | None = None) -> SileroVADAdapter:
        return cls(heads=dict(load_heads_dir(heads_uri, tasks, storage_options)), source=heads_uri)
