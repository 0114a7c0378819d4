"""jaxprune: stochastic pruning masks in JAX.

One idea per module: `masks` (mask pytrees), `pruners` (baseline masks), `estimators` (gradients of
expected losses over Bernoulli masks), `pft` (probabilistic fine-tuning), `linear` (closed-form linear
theory), `pac_bayes` (bounds and certificates), `schedules` and `scoring` (iterative structured pruning),
`flatness` (Hessian and gradient-covariance measures), `stats` (correlations and intervals), `data`,
`train`, `models`.
"""

__version__ = "0.1.0"

import os as _os

import jax as _jax

# XLA CPU compiles the partitionable threefry random-number code 3-4x more slowly (measured: a jitted
# Concrete-estimator step 51 s -> 14 s, an MLP init 18 s -> 8 s), and nearly every compiled program here
# draws random numbers. Keys stay explicit and results deterministic; only the stream differs from jax's
# default. Set JAXPRUNE_THREEFRY_PARTITIONABLE=1 to keep jax's default (e.g. for sharded RNG).
if _os.environ.get("JAXPRUNE_THREEFRY_PARTITIONABLE", "0") != "1":
    _jax.config.update("jax_threefry_partitionable", False)
