"""Model adapters: turn a (merged) state dict into a model and score it on a task.

Merging methods produce state dicts whose keys are exactly those of the zoo's
checkpoint files. An adapter knows one checkpoint family: how to build a module
from such a state dict, how to get the pre-classifier features (what
Auto-Switch's kNN router and WEMoE's routers look at), how to apply a task's
classification head, and how to turn dataset rows into input tensors. Heads
are never merged: they are per task and live outside the merged weights.

Modules (one job each; every byte they read goes through :mod:`tswitch_ray.io`):

* :mod:`.base` - the :class:`ModelAdapter` protocol, :class:`AdapterBase`
  (heads per task, strict loading with errors naming the source and keys),
  the key-layout helpers (:func:`~.base.select_prefixed`,
  :func:`~.base.hf_key_map` for transformers 5's renamed parameters).
* :mod:`.preprocess` - :class:`Preprocess`, :func:`collate_images` (open_clip's
  eval transform), :func:`collate_tokens`.
* :mod:`.heads` - :class:`LinearHead` and its file format,
  :func:`save_head`, :func:`load_head`, :func:`load_heads_dir`.
* :mod:`.hf_files` - reading Hugging Face folders: tensors (single, sharded or
  ``pytorch_model.bin``, as the build reads them), JSON configs, image
  statistics, each task's own head tensors (a PEFT adapter task's read
  through the adapter against the base).
* :mod:`.open_clip` - :class:`OpenClipVisionAdapter` (open_clip vision towers,
  ``model.visual.*`` / ``visual.*`` / bare keys).
* :mod:`.hf_clip` - :class:`HFCLIPVisionAdapter` (``CLIPVisionModel`` folders).
* :mod:`.hf_classifier` - :class:`HFClassifierAdapter`: any transformers
  ``*For{Sequence,Image}Classification`` zoo, models made by transformers'
  ``from_config``, each task's head applied by its own class's forward;
  :func:`check_model_types` (run before any work).
* :mod:`.hf_vit` - :class:`HFImageClassifierAdapter` (``AutoModelForImageClassification``:
  ViT, ConvNeXt, Swin, ...; ``HFViTClassifierAdapter`` is its former name).
* :mod:`.hf_sequence` - :class:`HFSequenceClassifierAdapter` (``AutoModelForSequenceClassification``:
  BERT / MiniLM, RoBERTa, DeBERTa(-v2), DistilBERT, ELECTRA).
* :mod:`.silero` - :class:`~.silero.SileroVADAdapter` (the silero-vad wheel's
  pretrained network, images read as signals: the real-model zoo).
* :mod:`.spec` - :func:`adapter_from_spec` (the JSON-able spec of ``demo.json``
  and eval configs) and :data:`ADAPTER_KINDS`.

A new family is one module with an :class:`AdapterBase` subclass, plus its
kind in :mod:`.spec`. docs/EVAL.md sets up an evaluation of one's own zoo.
"""

from tswitch_ray.eval.adapters.base import AdapterBase, ModelAdapter
from tswitch_ray.eval.adapters.heads import (
    HEAD_SUFFIX,
    LinearHead,
    load_head,
    load_heads_dir,
    save_head,
)
from tswitch_ray.eval.adapters.hf_classifier import (
    HFClassifierAdapter,
    check_model_types,
    supported_model_types,
)
from tswitch_ray.eval.adapters.hf_clip import HFCLIPVisionAdapter
from tswitch_ray.eval.adapters.hf_files import read_hf_folder_tensors, read_json
from tswitch_ray.eval.adapters.hf_sequence import HFSequenceClassifierAdapter
from tswitch_ray.eval.adapters.hf_vit import (
    HFImageClassifierAdapter,
    HFViTClassifierAdapter,
)
from tswitch_ray.eval.adapters.open_clip import (
    OpenClipVisionAdapter,
    resolve_open_clip_config,
)
from tswitch_ray.eval.adapters.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Preprocess,
    collate_images,
    collate_tokens,
)
from tswitch_ray.eval.adapters.spec import (
    ADAPTER_KINDS,
    HF_CLASSIFIER_KINDS,
    adapter_from_spec,
)

__all__ = [
    "ADAPTER_KINDS",
    "HEAD_SUFFIX",
    "HF_CLASSIFIER_KINDS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "AdapterBase",
    "HFCLIPVisionAdapter",
    "HFClassifierAdapter",
    "HFImageClassifierAdapter",
    "HFSequenceClassifierAdapter",
    "HFViTClassifierAdapter",
    "LinearHead",
    "ModelAdapter",
    "OpenClipVisionAdapter",
    "Preprocess",
    "adapter_from_spec",
    "check_model_types",
    "collate_images",
    "collate_tokens",
    "load_head",
    "load_heads_dir",
    "read_hf_folder_tensors",
    "read_json",
    "resolve_open_clip_config",
    "save_head",
    "supported_model_types",
]
