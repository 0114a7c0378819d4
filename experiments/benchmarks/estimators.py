"""Gradient estimators for J(s) = E_{m ~ Bern(sigmoid(s))} L(m): variance, bias and cost per step.

  python -m experiments.benchmarks.estimators --workdir=workdirs/bench_estimators  # 2 CPU-min
  python -m experiments.benchmarks.estimators --config.num_samples=16 --config.repeats=500

The problem (`make_problem`): an MLP trained briefly on sklearn digits, pruned by global magnitude
to `sparsity`, with mask logits +-logit(keep_prob) (the PFT starting point, pft-pac-bayes.md 1.3)
and L the cross-entropy on a fixed training batch, so all randomness comes from the masks. Each
estimator is called `repeats` times with independent keys and K = `num_samples` samples; its
gradients are compared with a reference: exact enumeration when the net has at most 16 prunable
weights, otherwise local expectation gradients from `reference_samples` masks (unbiased, d + 1
loss evaluations per mask; their own noise enters the noise floor). Columns of table.md:

* evals: loss evaluations per call (DisARM uses K antithetic pairs, i.e. 2K);
* rel_var: tr Cov(g) / |g*|^2 of one call; rel_var_x_evals: the same times evals (work-normalised);
* rel_bias: |mean g - g*| / |g*|, with noise_floor = sqrt(tr Cov / repeats + ref noise) / |g*|;
  a rel_bias at the floor means no bias was detected;
* cos: cosine between mean g and g*; rel_mse: E|g - g*|^2 / |g*|^2;
* ms, x_fwd_bwd: median wall time of one jitted call (over the `repeats` calls) and its ratio to
  one plain forward-backward pass of the same batch (grad of the loss w.r.t. the weights).

Writes to workdir: config.json, results.jsonl/csv, table.md, estimators.png.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_dict, config_flags
from tqdm import tqdm

from experiments import common
from experiments.benchmarks.roofline import time_calls
from jaxprune import data as data_lib
from jaxprune import estimators, masks, models, pruners, train

PyTree = Any


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.seed = 0
    c.dataset = "digits"  # jaxprune.data name; digits ships with sklearn (offline)
    c.widths = (64, 32)  # MLP hidden widths (jaxprune.models "mlp")
    c.train_steps = 300  # full-batch Adam steps for the dense net
    c.learning_rate = 3e-3
    c.batch_size = 256  # the fixed training batch the loss L(m) is computed on
    c.sparsity = 0.5  # global magnitude mask that sets the sign of each logit
    c.keep_prob = 0.9  # logits are +-logit(keep_prob), so p in {1 - keep_prob, keep_prob}
    c.prunable = ""  # comma-separated top-level modules to mask (e.g. "head"); "" = every kernel
    c.estimators = "reinforce,reinforce_ma,rloo,disarm,concrete,concrete_st,straight_through"
    c.tau = 0.5  # temperature of concrete / concrete_st
    c.ma_warmup = 20  # moving-average baseline: updates before measuring (else it is 0 at step 1)
    c.num_samples = 8  # K: mask samples per estimator call
    c.repeats = 200  # independent calls per estimator (variance and bias estimates)
    c.reference_samples = 32  # masks for the local-expectation reference (d + 1 evals each)
    c.quick = False  # smoke runs: 64-8-10 net, only the 80 head weights masked, 2 estimators
    return c


def _quick(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    c = config_dict.ConfigDict(c.to_dict())
    c.widths = (8,)
    c.train_steps = 50
    c.batch_size = 64
    c.prunable = "head"
    c.estimators = "rloo,concrete"
    c.ma_warmup = 2
    c.num_samples = 4
    c.repeats = 100
    c.reference_samples = 16
    return c


class Problem(NamedTuple):
    loss_fn: Callable[[PyTree], jax.Array]  # mask tree -> scalar L(m)
    logits: PyTree  # like params
    prunable: PyTree  # Python bools like params
    params: PyTree  # trained dense weights
    plain_loss_fn: Callable[[PyTree], jax.Array]  # params -> loss, for the forward-backward timing
    num_masked: int  # d, number of prunable entries


def make_problem(config: config_dict.ConfigDict) -> Problem:
    """Trained MLP on a fixed batch, magnitude-mask logits; see the module docstring."""
    ds = data_lib.load_dataset(config.dataset)
    model = models.get_model("mlp", ds.num_classes, widths=tuple(config.widths))
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    init_key, _ = jax.random.split(jax.random.key(config.seed))
    params = model.init(init_key, x[:1])["params"]
    tx = optax.adam(config.learning_rate)

    def dense_loss(p: PyTree, xb: jax.Array, yb: jax.Array) -> jax.Array:
        return train.cross_entropy(model.apply({"params": p}, xb), yb)

    @jax.jit
    def fit(p: PyTree) -> PyTree:
        def step(carry, _):
            p, opt = carry
            g = jax.grad(dense_loss)(p, x, y)
            updates, opt = tx.update(g, opt, p)
            return (optax.apply_updates(p, updates), opt), None

        return jax.lax.scan(step, (p, tx.init(p)), None, length=config.train_steps)[0][0]

    params = fit(params)
    prunable = masks.prunable_tree(params)
    if config.prunable:
        keep = set(common.parse_list(config.prunable))
        unknown = keep - set(params)
        if unknown:
            raise ValueError(
                f"prunable: unknown modules {sorted(unknown)}; known: {sorted(params)}"
            )
        prunable = {k: jax.tree.map(lambda f, k=k: f and k in keep, v) for k, v in prunable.items()}
    mask = pruners.magnitude(None, params, config.sparsity, prunable)
    s0 = float(np.log(config.keep_prob) - np.log1p(-config.keep_prob))
    logits = jax.tree.map(lambda m: jnp.where(m > 0, s0, -s0).astype(jnp.float32), mask)
    xb, yb = x[: config.batch_size], y[: config.batch_size]
    num_masked = sum(
        int(np.size(v)) for v, f in zip(jax.tree.leaves(params), jax.tree.leaves(prunable)) if f
    )
    return Problem(
        loss_fn=lambda m: dense_loss(masks.apply(params, m), xb, yb),
        logits=logits,
        prunable=prunable,
        params=params,
        plain_loss_fn=lambda p: dense_loss(p, xb, yb),
        num_masked=num_masked,
    )


def _flat(tree: PyTree, prunable: PyTree) -> jax.Array:
    """Prunable entries of a gradient tree as one vector."""
    leaves = [g for g, f in zip(jax.tree.leaves(tree), jax.tree.leaves(prunable)) if f]
    return jnp.concatenate([jnp.reshape(g, (-1,)) for g in leaves])


def _unflatten(v: jax.Array, problem: Problem) -> PyTree:
    """Inverse of `_flat` for masks: prunable entries from v, ones elsewhere."""
    leaves, treedef = jax.tree.flatten(problem.logits)
    out, offset = [], 0
    for x, f in zip(leaves, jax.tree.leaves(problem.prunable)):
        n = int(np.size(x))
        out.append(v[offset : offset + n].reshape(x.shape) if f else jnp.ones(x.shape, x.dtype))
        offset += n if f else 0
    return jax.tree.unflatten(treedef, out)


def _reference(
    problem: Problem, config: config_dict.ConfigDict, key: jax.Array
) -> tuple[np.ndarray, float]:
    """(g*, summed per-coordinate variance of g* as an estimate; 0 when exact).

    Exact enumeration for d <= 16; otherwise local expectation gradients (Titsias & Lazaro-Gredilla
    2015): dJ/ds_i = p_i (1 - p_i) E_m[L(m | m_i = 1) - L(m | m_i = 0)], each expectation estimated
    from `reference_samples` masks with d + 1 loss evaluations each. Unbiased, and unlike the score
    function its per-coordinate noise does not grow with d (each coordinate has its own difference).
    """
    if problem.num_masked <= estimators.MAX_EXACT_DIM:
        est = estimators.get_estimator("exact")
        g = jax.jit(
            lambda: est(problem.loss_fn, problem.logits, key, 1, prunable=problem.prunable).grads
        )()
        return np.asarray(_flat(g, problem.prunable)), 0.0
    s = _flat(problem.logits, problem.prunable)
    p = jax.nn.sigmoid(s)
    d = problem.num_masked

    @jax.jit
    def one(k: jax.Array) -> jax.Array:
        m = (jax.random.uniform(k, (d,)) < p).astype(s.dtype)
        base = problem.loss_fn(_unflatten(m, problem))

        def flipped(i: jax.Array) -> jax.Array:
            return problem.loss_fn(_unflatten(m.at[i].set(1 - m[i]), problem))

        flips = jax.lax.map(flipped, jnp.arange(d), batch_size=256)
        return p * (1 - p) * (2 * m - 1) * (base - flips)  # L(m_i=1) - L(m_i=0), times p(1-p)

    keys = jax.random.split(key, config.reference_samples)
    g = np.stack([np.asarray(one(k), np.float64) for k in tqdm(keys, desc="reference")])
    return g.mean(0), float(g.var(0, ddof=1).sum() / len(keys))


def _estimates(problem: Problem, config: config_dict.ConfigDict, name: str, key: jax.Array):
    """(repeats x d gradients, median ms per call): one jitted single call, looped on the host, so
    the same compiled step gives the variance, the bias and the timing."""
    opts = {"tau": float(config.tau)} if name.startswith("concrete") else {}
    est = estimators.get_estimator(name, **opts)
    K = int(config.num_samples)

    @jax.jit
    def step(k: jax.Array, state: estimators.EstimatorState):
        e = est(problem.loss_fn, problem.logits, k, K, state, prunable=problem.prunable)
        return _flat(e.grads, problem.prunable), e.state

    warm_key, key = jax.random.split(key)
    state = est.init(problem.logits)
    jax.block_until_ready(step(warm_key, state))  # compile
    if isinstance(state, estimators.MovingAverageState):  # warm the baseline at these logits
        for k in jax.random.split(warm_key, config.ma_warmup):
            state = step(k, state)[1]
    grads, times = [], []
    for k in jax.random.split(key, config.repeats):
        t0 = time.perf_counter()
        g = jax.block_until_ready(step(k, state)[0])  # the state is held fixed: i.i.d. calls
        times.append(time.perf_counter() - t0)
        grads.append(np.asarray(g, np.float64))
    return np.stack(grads), 1e3 * float(np.median(times))


def _plain_ms(problem: Problem, calls: int) -> float:
    plain = jax.jit(jax.value_and_grad(problem.plain_loss_fn))
    return 1e3 * float(np.median(time_calls(lambda: plain(problem.params), calls)))


def benchmark(problem: Problem, config: config_dict.ConfigDict) -> list[dict[str, Any]]:
    """One row of metrics per estimator in config.estimators."""
    ref_key, run_key = jax.random.split(jax.random.key(config.seed + 1))
    g_ref, ref_noise = _reference(problem, config, ref_key)
    norm2 = float(g_ref @ g_ref)
    plain_ms = _plain_ms(problem, max(config.repeats, 20))
    rows = []
    for name in tqdm(common.parse_list(config.estimators), desc="estimators"):
        g, ms = _estimates(problem, config, name, run_key)
        tr_cov = float(g.var(0, ddof=1).sum())
        mean = g.mean(0)
        evals = 2 * config.num_samples if name == "disarm" else config.num_samples
        rows.append(
            {
                "estimator": name,
                "evals": evals,
                "rel_var": tr_cov / norm2,
                "rel_var_x_evals": evals * tr_cov / norm2,
                "rel_bias": float(np.linalg.norm(mean - g_ref)) / np.sqrt(norm2),
                "noise_floor": float(np.sqrt((tr_cov / config.repeats + ref_noise) / norm2)),
                "cos": float(mean @ g_ref / (np.linalg.norm(mean) * np.sqrt(norm2) + 1e-30)),
                "rel_mse": float(np.mean(np.sum((g - g_ref[None]) ** 2, 1))) / norm2,
                "ms": ms,
                "x_fwd_bwd": ms / plain_ms,
                "plain_ms": plain_ms,
                "grad_norm_ref": float(np.sqrt(norm2)),
                "ref_rel_noise": float(np.sqrt(ref_noise / norm2)),
                "num_masked": problem.num_masked,
            }
        )
    return rows


COLUMNS = (
    "estimator",
    "evals",
    "rel_var",
    "rel_var_x_evals",
    "rel_bias",
    "noise_floor",
    "cos",
    "rel_mse",
    "ms",
    "x_fwd_bwd",
)


def _plot(path: str, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["estimator"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in [
        (axes[0], "rel_var", "tr Cov(g) / |g*|^2 (one call)"),
        (axes[1], "rel_bias", "|E g - g*| / |g*|"),
        (axes[2], "x_fwd_bwd", "time / plain fwd-bwd"),
    ]:
        ax.bar(names, [r[key] for r in rows], color="C0")
        if key == "rel_bias":
            ax.plot(names, [r["noise_floor"] for r in rows], "k_", ms=20, label="noise floor")
            ax.legend(fontsize=7)
        if key != "x_fwd_bwd":
            ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    """Builds the problem, benchmarks every estimator, writes the files; returns {"rows": [...]}."""
    c = _quick(config) if config.quick else config
    common.setup_workdir(c, workdir)
    problem = make_problem(c)
    rows = benchmark(problem, c)
    common.write_records(workdir, "results", rows)
    ref = (
        "exact enumeration"
        if problem.num_masked <= estimators.MAX_EXACT_DIM
        else (
            f"local expectation gradients from {c.reference_samples} masks "
            f"(relative noise {rows[0]['ref_rel_noise']:.3g})"
        )
    )
    header = (
        f"{problem.num_masked} masked weights, K = {c.num_samples}, "
        f"{c.repeats} calls per estimator, "
        f"reference: {ref}; plain forward-backward {rows[0]['plain_ms']:.3g} ms.\n\n"
    )
    table = header + common.markdown_table(rows, COLUMNS)
    common.write_text(workdir, "table.md", table)
    _plot(f"{workdir}/estimators.png", rows)
    print(table)
    return {"rows": rows}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", "workdirs/bench_estimators", "Output directory.")
    app.run(main)
