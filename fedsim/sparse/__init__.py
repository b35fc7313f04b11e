"""SpaFL maths: threshold-masked layers, their regulariser, updates, aggregation and costs.

SpaFL (Kim, Saad, Debbah and Hong, "SpaFL: Communication-Efficient Federated Learning with
Sparse Models and Low Computational Overhead", NeurIPS 2024, arXiv 2406.00431) prunes whole
output units with one trainable threshold each and communicates only the thresholds. This
package contains the method's tensor maths, free of Flower, Ray and file I/O:

- ``layers``: ``MaskedLinear``, ``MaskedConv2d``, the straight-through step, ``to_masked`` and
  getters and setters for thresholds and the local state.
- ``updates``: the regulariser α·c(t)·Σ exp(−τ), the threshold-change weight step and the
  collapse reset.
- ``aggregate``: averaging of client thresholds and threshold changes.
- ``cost``: densities and multiply-accumulate counts.

"The official code" in these modules means the authors' repository news-vt/SpaFL_NeruIPS_2024
on GitHub (sic), whose variants are available as options here.
"""

from fedsim.sparse.aggregate import mean_thresholds, sum_threshold_deltas, threshold_delta
from fedsim.sparse.cost import (
    TRAIN_MACS_FACTOR,
    DensityReport,
    all_param_density,
    dense_layer_macs,
    density_report,
    forward_macs,
    layer_densities,
    mean_layer_density,
    param_density,
    train_step_macs,
)
from fedsim.sparse.layers import (
    STE_MODES,
    MaskedConv2d,
    MaskedLayer,
    MaskedLinear,
    SteMode,
    ThresholdStep,
    get_local_state,
    get_thresholds,
    masked_layers,
    set_local_state,
    set_ste,
    set_thresholds,
    threshold_parameters,
    threshold_step,
    to_masked,
)
from fedsim.sparse.updates import (
    DIVISORS,
    SIGN_MODES,
    Divisor,
    SignMode,
    apply_threshold_update,
    clip_thresholds_,
    reset_collapsed_thresholds,
    sign_changes,
    threshold_penalty,
    threshold_weight_update,
    warmup_coefficient,
)

__all__ = [
    "DIVISORS",
    "SIGN_MODES",
    "STE_MODES",
    "TRAIN_MACS_FACTOR",
    "DensityReport",
    "Divisor",
    "MaskedConv2d",
    "MaskedLayer",
    "MaskedLinear",
    "SignMode",
    "SteMode",
    "ThresholdStep",
    "all_param_density",
    "apply_threshold_update",
    "clip_thresholds_",
    "dense_layer_macs",
    "density_report",
    "forward_macs",
    "get_local_state",
    "get_thresholds",
    "layer_densities",
    "masked_layers",
    "mean_layer_density",
    "mean_thresholds",
    "param_density",
    "reset_collapsed_thresholds",
    "set_local_state",
    "set_ste",
    "set_thresholds",
    "sign_changes",
    "sum_threshold_deltas",
    "threshold_delta",
    "threshold_parameters",
    "threshold_penalty",
    "threshold_step",
    "threshold_weight_update",
    "to_masked",
    "train_step_macs",
    "warmup_coefficient",
]
