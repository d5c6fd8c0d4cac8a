"""Hugging Face ``*ForImageClassification`` zoos: ViT (the 30-ViT benchmark), and any model type
``AutoModelForImageClassification`` builds from pixel values (ConvNeXt, Swin, DeiT, BEiT, ResNet, ...).

The backbone (``vit.*``, ``convnext.*``, ...) is merged; each task folder's own
``classifier.*`` is applied by transformers' own forward (see
:mod:`.hf_classifier`). Features are what the classifier sees: the pooled
output, or ViT's final-layernormed CLS token.
"""

from __future__ import annotations

from dataclasses import dataclass

from tswitch_ray.eval.adapters.hf_classifier import HFClassifierAdapter


@dataclass
class HFImageClassifierAdapter(HFClassifierAdapter):
    """``AutoModelForImageClassification`` zoos (spec kind ``hf_image_classifier``, or ``hf_vit_classifier``)."""

    modality: str = "image"
    kind: str = "hf_image_classifier"


# The name of the ViT-only adapter this generalises; specs of kind hf_vit_classifier build this class.
HFViTClassifierAdapter = HFImageClassifierAdapter

__all__ = ["HFImageClassifierAdapter", "HFViTClassifierAdapter"]
