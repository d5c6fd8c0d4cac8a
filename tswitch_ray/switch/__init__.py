"""Pure math of task switches: task vectors, exact thresholds, binarize, reconstruct.

Tensors in, tensors (and small numpy/dataclass statistics) out; no I/O, no Ray.
Every formula here is specified in docs/MATH.md ("Task vectors", "Thresholds
(P-Discard cut)", "Switches and knobs", "Reconstruction", "DARE").

``fine_histograms`` at this level is the ARCHITECTURE.md seam and accepts
either a :class:`RefineRequest` (signed, for thresholds) or an iterable of
bucket ids (over |x|, as :func:`select.fine_histograms`).
"""

from tswitch_ray.switch.binarize import KNOB_MODES, KeptStats, KnobMode, binarize, binarize_many, kept_stats, knob
from tswitch_ray.switch.reconstruct import reconstruct, reconstruct_into, switch_delta
from tswitch_ray.switch.select import (
    N_BUCKETS,
    add_fine,
    coarse_histogram,
    kth_smallest,
    refine_buckets,
    resolve,
)
from tswitch_ray.switch.select import fine_histograms as bucket_fine_histograms
from tswitch_ray.switch.taskvec import lora_task_vector, task_vector
from tswitch_ray.switch.thresholds import (
    RefineRequest,
    SignedFine,
    SignedHistograms,
    Thresholds,
    discard_count,
    fine_histograms,
    refine_request,
    resolve_thresholds,
    signed_fine_histograms,
    signed_histograms,
    tensor_thresholds,
)
from tswitch_ray.switch.transforms import bin_discard, dare, p_discard

__all__ = [
    "KNOB_MODES",
    "N_BUCKETS",
    "KeptStats",
    "KnobMode",
    "RefineRequest",
    "SignedFine",
    "SignedHistograms",
    "Thresholds",
    "add_fine",
    "bin_discard",
    "binarize",
    "binarize_many",
    "bucket_fine_histograms",
    "coarse_histogram",
    "dare",
    "discard_count",
    "fine_histograms",
    "kept_stats",
    "knob",
    "kth_smallest",
    "lora_task_vector",
    "p_discard",
    "reconstruct",
    "reconstruct_into",
    "refine_buckets",
    "refine_request",
    "resolve",
    "resolve_thresholds",
    "signed_fine_histograms",
    "signed_histograms",
    "switch_delta",
    "task_vector",
    "tensor_thresholds",
]
