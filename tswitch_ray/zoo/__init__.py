"""zoo layer: the zoo manifest, the :class:`Zoo`, synthetic zoos and pickle conversion.

* :func:`load_zoo` / :class:`Zoo` - a base and N task checkpoints from a
  ``zoo.yaml`` (local, file://, memory:// or s3://), validated with clear
  :class:`~tswitch_ray.errors.ZooError` messages.
* :func:`synth_zoo` - synthetic zoos with open_clip ViT vision-tower shapes, or Llama-shaped
  sharded HF folders (:mod:`~tswitch_ray.zoo.synth_llm`).
* :func:`~tswitch_ray.zoo.taskvectors.read_task_vector` - τ of a task and tensor, dense or LoRA adapter.
* :func:`convert_checkpoint` - explicit pickle -> safetensors conversion.
* :class:`KeyRules` / :class:`MappedReader` - a checkpoint's key layout
  (``prefix``/``rename``, or a detected prefix) and the reader that applies it.

The checkpoint readers and writers live in the I/O layer
(:mod:`tswitch_ray.io.checkpoints`, :mod:`tswitch_ray.io.safetensors`); the
most used of them are re-exported here for the zoo's users.
"""

from tswitch_ray.io.checkpoints import (
    CheckpointReader,
    TensorInfo,
    TorchStateDictReader,
    dtype_name,
    dtype_to_torch,
)
from tswitch_ray.io.readers import open_checkpoint
from tswitch_ray.io.safetensors import (
    SafetensorsReader,
    SafetensorsStreamWriter,
    ShardedSafetensorsReader,
    save_safetensors,
    save_sharded,
)
from tswitch_ray.zoo.convert import convert_checkpoint
from tswitch_ray.zoo.keymap import KeyRules
from tswitch_ray.zoo.manifest import TaskEntry, ZooManifest, parse_manifest, read_manifest, resolve_uri
from tswitch_ray.zoo.synth import ARCHS, synth_zoo, vision_tower_layout
from tswitch_ray.zoo.mapped import MappedReader
from tswitch_ray.zoo.zoo import FINGERPRINT_SAMPLE_BYTES, Zoo, check_finite, load_zoo

__all__ = [
    "ARCHS",
    "FINGERPRINT_SAMPLE_BYTES",
    "CheckpointReader",
    "KeyRules",
    "MappedReader",
    "SafetensorsReader",
    "SafetensorsStreamWriter",
    "ShardedSafetensorsReader",
    "TaskEntry",
    "TensorInfo",
    "TorchStateDictReader",
    "Zoo",
    "ZooManifest",
    "check_finite",
    "convert_checkpoint",
    "dtype_name",
    "dtype_to_torch",
    "load_zoo",
    "open_checkpoint",
    "parse_manifest",
    "read_manifest",
    "resolve_uri",
    "save_safetensors",
    "save_sharded",
    "synth_zoo",
    "vision_tower_layout",
]
