"""lrp: a JAX-native Layer-wise Relevance Propagation library.

    import lrp
    R = lrp.relevance(model.apply, variables, x, composite=lrp.composites.EpsilonPlusFlat())
    R = lrp.relevance(vit.apply, variables, x, composite=lrp.composites.get("attnlrp"))
    R = lrp.relevance(nnx_or_equinox_module, x, composite=lrp.composites.get("cp-lrp"))

The model is traced to a jaxpr and re-evaluated with every rule site (convolutions, dense layers,
pooling sums, residual sums, activations, softmax, LayerNorm/RMSNorm, the matmuls of attention)
replaced by a `jax.custom_vjp` function whose backward pass is its LRP rule; the relevance is the VJP of that function seeded with the starting
relevance. One jittable, vmappable function; parameters are never mutated.
"""

from __future__ import annotations

from lrp import (attribution, canonizers, composites, core, frameworks, graph, interpret,
                 patterns, rules)
from lrp.core import CompositeError, LRPError, Stabilizer, UnsupportedLayerError, stabilize
from lrp.propagation import (Explanation, convergence_delta, describe, explain, relevance,
                             relevance_fn)

__version__ = "0.2.0"

__all__ = [
    "attribution", "canonizers", "composites", "core", "frameworks", "graph", "interpret",
    "patterns", "rules",
    "CompositeError", "LRPError", "Stabilizer", "UnsupportedLayerError", "stabilize",
    "Explanation", "convergence_delta", "describe", "explain", "relevance", "relevance_fn",
]
