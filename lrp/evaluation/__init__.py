"""Scoring explanations: against a ground-truth mask, and by perturbing the input.

Generic: nothing here knows about brains. Arrays are batched along axis 0; every other axis is a
feature axis (for a multi-channel input, pool the channels first with `pool_channels` to score
locations, e.g. voxels, rather than voxel x channel elements).

Against ground truth (Arras, Osman & Samek 2022, CLEVR-XAI):
  - relevance mass accuracy = sum of positive relevance inside the mask / total positive
    relevance;
  - relevance rank accuracy = |top-K elements inside the mask| / K with K = mask size (ties at
    the K-th value are split in expectation, so a constant map scores exactly the mask share);
  - `mask_share` = |mask| / |support|: what a map without information scores on both (in
    expectation).

Region perturbation (Samek et al. 2017), in any number of spatial dimensions (channels last):
the input is tiled into non-overlapping patches (cubes in 3D); patches are ranked by their summed
relevance and replaced by a baseline (e.g. a blurred copy of the input) most relevant first
(MoRF), least relevant first (LeRF) or in random order, in `steps` equal steps; the model output
is recorded after every step. AOPC (area over the perturbation curve) = mean over the steps
k = 0..L of f(x_0) - f(x_k), in the output's units; ABPC = mean of f(LeRF_k) - f(MoRF_k).

Model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps"; cascading):
the layers are randomised one after another from the output to the input, and after every step
the map of the partly random model is compared with the trained model's map (Spearman rank
correlation of absolute and of signed values, Pearson correlation, overlap of the top elements).
A method whose map stays the same while the model it explains is destroyed fails the check.

All functions are jittable and batched: no Python loop over voxels or patches; the steps of a
curve run in one `lax.map` over model evaluations of the whole batch.

Modules (every public name is re-exported here: `from lrp import evaluation as ev`):
  localisation   relevance mass and rank accuracy, mask share, pool_channels;
  perturbation   patch scores, perturbation curves (MoRF, LeRF, random), AOPC, baselines;
  randomisation  map similarity, layer order, randomise_layer, model-parameter randomisation;
  arrays         the batched-array checks they share.
"""

from __future__ import annotations

from lrp.evaluation.localisation import (mask_share, pool_channels, relevance_mass_accuracy,
                                         relevance_rank_accuracy)
from lrp.evaluation.perturbation import (PerturbationCurve, RegionPerturbation, aopc,
                                         blur_baseline, patch_mean_baseline, patch_scores,
                                         perturbation_curve, random_perturbation_curve,
                                         region_perturbation)
from lrp.evaluation.randomisation import (MapSimilarity, ParameterRandomisation, layer_order,
                                          map_similarity, model_parameter_randomisation,
                                          randomise_layer)

__all__ = [
    "relevance_mass_accuracy", "relevance_rank_accuracy", "mask_share", "pool_channels",
    "patch_scores", "perturbation_curve", "random_perturbation_curve", "region_perturbation",
    "aopc", "blur_baseline", "patch_mean_baseline", "PerturbationCurve", "RegionPerturbation",
    "model_parameter_randomisation", "map_similarity", "randomise_layer", "layer_order",
    "ParameterRandomisation", "MapSimilarity",
]
