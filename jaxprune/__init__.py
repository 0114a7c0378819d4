"""jaxprune: stochastic pruning masks in JAX.

One idea per module: `masks` (mask pytrees), `pruners` (baseline masks), `estimators` (gradients of
expected losses over Bernoulli masks), `pft` (probabilistic fine-tuning), `linear` (closed-form linear
theory), `pac_bayes` (bounds and certificates), `schedules` and `scoring` (iterative structured pruning),
`flatness` (Hessian and gradient-covariance measures), `stats` (correlations and intervals), `data`,
`train`, `models`.
"""

__version__ = "0.1.0"
