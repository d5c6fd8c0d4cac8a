"""Hugging Face ``*ForSequenceClassification`` zoos: BERT (MiniLM), RoBERTa, DeBERTa(-v2), DistilBERT, ELECTRA, ...

The backbone (``bert.*``, ``roberta.*``, ``deberta.*``, ...) is merged; each
task folder's own head is applied by transformers' own forward (see
:mod:`.hf_classifier`). Inputs are token ids, right-padded with the config's
``pad_token_id``; features are the first token's last hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass

from tswitch_ray.eval.adapters.hf_classifier import (
    SEQUENCE_MODEL_TYPES,
    HFClassifierAdapter,
)


@dataclass
class HFSequenceClassifierAdapter(HFClassifierAdapter):
    """``AutoModelForSequenceClassification`` zoos of the model types in :data:`SEQUENCE_MODEL_TYPES`."""

    modality: str = "text"
    kind: str = "hf_sequence_classifier"


__all__ = ["SEQUENCE_MODEL_TYPES", "HFSequenceClassifierAdapter"]
