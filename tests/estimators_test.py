"""Estimators against exact enumeration on a 2-3-1 tanh MLP with 9 maskable weights (512 masks).

All sampled estimators are evaluated for N keys in ONE jitted function (`_one` vmapped over keys),
and the same `_one` jitted without vmap gives the single-call side of the vmap-equivalence test.
Threefry dominates compile time on XLA CPU, so few compiles is the whole speed budget of this file.
"""

from __future__ import annotations

import itertools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special
from scipy import stats as sps

from jaxprune import estimators as est_lib

PyTree = Any

X = jnp.array([[0.5, -1.0], [1.5, 0.3], [-0.7, 0.8], [0.2, 0.1]])
Y = jnp.array([0.3, -0.2, 0.5, 1.0])
PARAMS = {
    "dense1": {
        "kernel": jnp.array([[0.8, -0.5, 1.2], [0.4, 0.9, -1.1]]),
        "bias": jnp.array([0.1, -0.1, 0.05]),
    },
    "head": {"kernel": jnp.array([[1.0], [-0.7], [0.6]]), "bias": jnp.array([0.2])},
}
PRUNABLE = {"dense1": {"kernel": True, "bias": False}, "head": {"kernel": True, "bias": False}}
# Logits in [-1.5, 1.5], so p lies in (0.18, 0.82); biases have logits but are not prunable.
LOGITS = jax.tree.map(lambda a: jnp.linspace(-1.5, 1.5, a.size).reshape(a.shape), PARAMS)

N = 4000  # independent estimator calls (keys)
K = 4  # samples per call
TAUS = jnp.array([1.0, 0.5, 0.25])
MA_STATE = est_lib.MovingAverageState(
    jnp.array(0.5), jnp.array(3, jnp.int32)
)  # b = 0.5 / (1 - 0.9^3)
UNBIASED = ("reinforce", "reinforce_ma", "rloo", "disarm")
HARD_FORWARD = ("reinforce", "rloo", "disarm", "straight_through", "concrete_st")


def loss_fn(mask: PyTree, params: PyTree = PARAMS) -> jax.Array:
    """Mean squared error + 1 (the offset makes the no-baseline REINFORCE variance visible)."""
    w = jax.tree.map(lambda a, m: a * m, params, mask)
    h = jnp.tanh(X @ w["dense1"]["kernel"] + w["dense1"]["bias"][None])
    out = (h @ w["head"]["kernel"])[:, 0] + w["head"]["bias"]
    return jnp.mean((out - Y) ** 2) + 1.0


def _one(key: jax.Array) -> dict[str, Any]:
    """Every sampled estimator at one key (the same key), joint-weights RLOO, concrete at TAUS."""
    out = {}
    for name in ("reinforce", "reinforce_ma", "rloo", "disarm", "straight_through", "concrete_st"):
        est = est_lib.get_estimator(name)
        state = MA_STATE if name == "reinforce_ma" else est.init(LOGITS)
        out[name] = est(loss_fn, LOGITS, key, K, state, prunable=PRUNABLE)
    ma = est_lib.get_estimator("reinforce_ma")  # decay 0.9
    out["reinforce_ma_init"] = ma(loss_fn, LOGITS, key, K, ma.init(LOGITS), prunable=PRUNABLE)
    out["masks"] = est_lib.sample_masks(key, LOGITS, K, PRUNABLE)  # the masks REINFORCE uses
    out["losses"] = jax.vmap(loss_fn)(out["masks"])
    out["rloo_joint"] = est_lib.get_estimator("rloo")(
        loss_fn, LOGITS, key, K, params=PARAMS, prunable=PRUNABLE
    )
    out["concrete"] = jax.vmap(
        lambda t: est_lib.relaxed_bernoulli(loss_fn, LOGITS, key, K, prunable=PRUNABLE, tau=t)
    )(TAUS)
    return out


_one_jit = jax.jit(_one)
_many_jit = jax.jit(jax.vmap(_one))


@pytest.fixture(scope="module")
def keys() -> jax.Array:
    return jax.random.split(jax.random.key(0), N)


@pytest.fixture(scope="module")
def sampled(keys: jax.Array) -> dict[str, Any]:
    return jax.device_get(_many_jit(keys))


@pytest.fixture(scope="module")
def exact() -> est_lib.Estimate:
    fn = jax.jit(
        lambda: est_lib.get_estimator("exact")(
            loss_fn, LOGITS, None, 1, params=PARAMS, prunable=PRUNABLE
        )
    )
    return jax.device_get(fn())


def _flat(tree: PyTree, lead: int = 0) -> np.ndarray:
    """Prunable entries only (the kernels), flattened, keeping `lead` leading axes."""
    leaves = [tree["dense1"]["kernel"], tree["head"]["kernel"]]
    return np.concatenate([np.asarray(a).reshape(np.shape(a)[:lead] + (-1,)) for a in leaves], -1)


def _z(samples: np.ndarray, target: np.ndarray) -> np.ndarray:
    """|mean - target| in standard errors of the mean, per coordinate."""
    se = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
    assert np.all(se > 0)
    return np.abs(samples.mean(0) - target) / se


def test_exact_matches_brute_force(exact: est_lib.Estimate) -> None:
    # Independent oracle: dJ/ds_i = sum_m P(m) (m_i - p_i) L(m) (score identity), in float64 numpy.
    s = _flat(LOGITS).astype(np.float64)
    p = 1 / (1 + np.exp(-s))
    bits = np.array(list(itertools.product([0.0, 1.0], repeat=9)))
    mask_tree = {
        "dense1": {"kernel": bits[:, :6].reshape(-1, 2, 3), "bias": np.ones((512, 3))},
        "head": {"kernel": bits[:, 6:].reshape(-1, 3, 1), "bias": np.ones((512, 1))},
    }
    losses = np.asarray(
        jax.jit(jax.vmap(loss_fn))(jax.tree.map(jnp.asarray, mask_tree)), np.float64
    )
    prob = np.prod(np.where(bits == 1, p, 1 - p), axis=1)
    np.testing.assert_allclose(prob.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(exact.value, prob @ losses, rtol=1e-5)
    np.testing.assert_allclose(
        _flat(exact.grads), (prob * losses) @ (bits - p), rtol=1e-4, atol=1e-7
    )
    # Weight gradients: sum_m P(m) grad_w L(m, w), per-mask autodiff weighted in float64 numpy.
    per_mask = jax.jit(jax.vmap(jax.grad(loss_fn, argnums=1), in_axes=(0, None)))(
        jax.tree.map(jnp.asarray, mask_tree), PARAMS
    )
    expected = jax.tree.map(lambda g: np.tensordot(prob, np.asarray(g, np.float64), 1), per_mask)
    chex.assert_trees_all_close(exact.param_grads, expected, rtol=1e-4, atol=1e-7)
    # Non-prunable leaves: zero gradient.
    assert np.all(np.asarray(exact.grads["dense1"]["bias"]) == 0)
    assert np.all(np.asarray(exact.grads["head"]["bias"]) == 0)
    assert isinstance(exact.state, est_lib.EmptyState)


@pytest.mark.parametrize("name", UNBIASED)
def test_unbiased_estimator_matches_exact(
    name: str, sampled: dict, exact: est_lib.Estimate
) -> None:
    z = _z(_flat(sampled[name].grads, 1), _flat(exact.grads))
    assert z.max() < 4.0, (name, z)


def test_joint_param_grads_unbiased(sampled: dict, exact: est_lib.Estimate) -> None:
    est = sampled["rloo_joint"]
    for leaf in ("kernel", "bias"):
        for layer in ("dense1", "head"):
            g = np.asarray(est.param_grads[layer][leaf]).reshape(N, -1)
            z = _z(g, np.asarray(exact.param_grads[layer][leaf]).reshape(-1))
            assert z.max() < 4.0, (layer, leaf, z)
    # Same logit gradients as without params (same key, same masks).
    # atol: the two are different compiled programs (jax 0.12 reassociates to ~2e-7 near zero).
    chex.assert_trees_all_close(est.grads, sampled["rloo"].grads, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", HARD_FORWARD)
def test_value_is_unbiased_for_hard_forward(
    name: str, sampled: dict, exact: est_lib.Estimate
) -> None:
    values = np.asarray(sampled[name].value)[:, None]
    assert _z(values, np.asarray(exact.value)[None]).max() < 4.0


def test_straight_through_is_biased(sampled: dict, exact: est_lib.Estimate) -> None:
    # An ablation: its mean is many standard errors away from the truth on this problem.
    assert _z(_flat(sampled["straight_through"].grads, 1), _flat(exact.grads)).max() > 10.0


_mask_grads = jax.jit(jax.vmap(jax.grad(loss_fn)))  # dL/dm at each of K masks


@pytest.mark.parametrize("row", [0, 1])
def test_straight_through_is_the_chain_rule_at_the_sampled_masks(row: int, sampled: dict) -> None:
    # g = mean_k dL/dm(m_k) * p (1 - p) at the very masks REINFORCE draws (`sample_masks`), forward
    # value = mean_k L(m_k). The bias test above passes for any wrong gradient, e.g. a backward
    # pass without the sigmoid' factor or with soft masks; this one does not.
    p = 1 / (1 + np.exp(-_flat(LOGITS).astype(np.float64)))
    masks = jax.tree.map(lambda a: a[row], sampled["masks"])
    dl_dm = _flat(jax.device_get(_mask_grads(masks)), 1)  # (K, d)
    est = jax.tree.map(lambda a: a[row], sampled["straight_through"])
    np.testing.assert_allclose(_flat(est.grads), dl_dm.mean(0) * p * (1 - p), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(est.value, sampled["losses"][row].mean(), rtol=1e-6)
    assert np.all(np.asarray(est.grads["dense1"]["bias"]) == 0)


def test_relaxed_bias_shrinks_with_tau(sampled: dict, exact: est_lib.Estimate) -> None:
    g = _flat(sampled["concrete"].grads, 2)  # (N, taus, d)
    target = _flat(exact.grads)
    bias = np.linalg.norm(g.mean(0) - target, axis=-1)
    se = np.sqrt(g.var(0, ddof=1).sum(-1) / N)  # noise in each bias estimate
    # Measured: bias 0.033, 0.015, 0.0075 for tau = 1, 0.5, 0.25 (|exact grad| = 0.107).
    for i in range(len(TAUS) - 1):
        assert bias[i] - bias[i + 1] > 3 * np.hypot(se[i], se[i + 1]), (bias, se)
    assert bias[0] > 0.2 * np.linalg.norm(target)


# Concrete on a linear loss L(m) = c . m: E[L(m~)] and its gradient are 1-D integrals over the
# logistic noise (scipy quadrature oracle), and the straight-through variant's backward pass must be
# the soft one exactly (dL/dm = c whatever the forward mask). One sample per key, N keys.
LIN_S = np.array([-1.0, 0.3, 1.2], np.float32)
LIN_C = np.array([1.0, -2.0, 0.5], np.float32)
LIN_TAU = 0.5


def _linear_loss(mask: PyTree) -> jax.Array:
    return jnp.dot(jnp.asarray(LIN_C), mask["w"])


@jax.jit
def _concrete_linear(keys: jax.Array) -> dict[str, est_lib.Estimate]:
    def one(k: jax.Array) -> dict[str, est_lib.Estimate]:
        return {
            name: est_lib.get_estimator(name, tau=LIN_TAU)(_linear_loss, {"w": LIN_S}, k, 1)
            for name in ("concrete", "concrete_st")
        }

    return jax.vmap(one)(keys)


def test_concrete_matches_quadrature_on_linear_loss() -> None:
    out = jax.device_get(_concrete_linear(jax.random.split(jax.random.key(1), N)))
    soft, hard = out["concrete"], out["concrete_st"]

    def noise_mean(f: Any, s: float) -> float:  # E_l f((s + l) / tau), l ~ Logistic(0, 1)
        return integrate.quad(lambda l: f((s + l) / LIN_TAU) * sps.logistic.pdf(l), -60, 60)[0]

    dsig = lambda z: special.expit(z) * (1 - special.expit(z))
    relaxed = np.array([noise_mean(special.expit, s) for s in LIN_S])
    slope = np.array([noise_mean(dsig, s) / LIN_TAU for s in LIN_S])  # d/ds E[sigmoid((s+l)/tau)]
    # Soft: mean gradient and value of the relaxed objective (4 SE, N = 4000; tau misplaced as
    # sigmoid(s / tau + l) or Gumbel instead of logistic noise moves them by > 10 SE).
    assert _z(soft.grads["w"], LIN_C * slope).max() < 4.0
    assert _z(soft.value[:, None], np.array([LIN_C @ relaxed])).max() < 4.0
    # Hard: forward losses are c . b for binary b, mean c . sigmoid(s); backward = soft, exactly.
    combos = np.array(list(itertools.product([0.0, 1.0], repeat=3))) @ LIN_C
    assert np.abs(hard.value[:, None] - combos[None]).min(1).max() < 1e-6
    assert _z(hard.value[:, None], np.array([LIN_C @ special.expit(LIN_S)])).max() < 4.0
    np.testing.assert_allclose(hard.grads["w"], soft.grads["w"], rtol=1e-6)


def test_rloo_has_lower_variance_than_no_baseline(sampled: dict) -> None:
    var_none = _flat(sampled["reinforce"].grads, 1).var(0).sum()
    var_rloo = _flat(sampled["rloo"].grads, 1).var(0).sum()
    # Measured: 1.05 vs 0.051 (ratio 0.05); the loss is offset by +1, which only a baseline removes.
    assert var_rloo < 0.2 * var_none, (var_rloo, var_none)


@pytest.mark.parametrize("row", [0, 1])
def test_moving_average_state_updates(row: int, sampled: dict) -> None:
    # g = mean_k (L_k - b)(m_k - p) with b = ema / (1 - decay^count) (0 at count 0), then
    # ema <- 0.9 ema + 0.1 mean_k L_k.
    p = 1 / (1 + np.exp(-_flat(LOGITS)))
    m = _flat(jax.tree.map(lambda a: a[row], sampled["masks"]), 1)  # (K, d)
    losses = sampled["losses"][row]
    for name, (ema, count) in [("reinforce_ma_init", (0.0, 0)), ("reinforce_ma", (0.5, 3))]:
        est = jax.tree.map(lambda a: a[row], sampled[name])
        b = ema / (1 - 0.9**count) if count else 0.0
        expected = ((losses - b)[:, None] * (m - p[None])).mean(0)
        np.testing.assert_allclose(_flat(est.grads), expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(est.value, losses.mean(), rtol=1e-6)
        assert isinstance(est.state, est_lib.MovingAverageState)
        assert int(est.state.count) == count + 1
        np.testing.assert_allclose(est.state.ema, 0.9 * ema + 0.1 * losses.mean(), rtol=1e-6)
    # At count 0 the baseline is 0: identical to plain REINFORCE on the same key.
    chex.assert_trees_all_close(sampled["reinforce_ma_init"].grads, sampled["reinforce"].grads)


def test_vmap_over_keys_equals_single_calls(keys: jax.Array, sampled: dict) -> None:
    for i in range(2):
        single = jax.device_get(_one_jit(keys[i]))
        row = jax.tree.map(lambda a, i=i: a[i], sampled)
        chex.assert_trees_all_close(single, row, rtol=1e-5, atol=1e-6)


def test_unknown_names_and_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="unknown estimator 'reinfroce'; known: .*'rloo'"):
        est_lib.get_estimator("reinfroce")
    with pytest.raises(ValueError, match="unknown options \\['temperature'\\]"):
        est_lib.get_estimator("concrete", temperature=0.5)
    with pytest.raises(ValueError, match="unknown baseline"):
        est_lib.get_estimator("reinforce", baseline="mean")
    with pytest.raises(ValueError, match="tau must be > 0"):
        est_lib.get_estimator("concrete", tau=0.0)
    # Trace-time errors: jit (never compiled, so no random-number code to build).
    key = jax.random.key(0)
    small = {"w": jnp.zeros((3,))}
    total = lambda m: jnp.sum(m["w"])

    def call(name: str, loss: Any = total, logits: PyTree = small, num: int = 1, **kw: Any) -> None:
        jax.jit(lambda k: est_lib.get_estimator(name)(loss, logits, k, num, **kw).value)(key)

    with pytest.raises(ValueError, match="num_samples must be >= 2 for the rloo baseline"):
        call("rloo")
    with pytest.raises(ValueError, match="needs a MovingAverageState"):
        call("reinforce_ma", num=2)
    with pytest.raises(ValueError, match="d = 17 prunable entries > max_dim = 16"):
        call("exact", logits={"w": jnp.zeros((17,))})
    with pytest.raises(ValueError, match="prunable leaf 'w' must be a Python bool"):
        call("disarm", prunable={"w": jnp.array(True)})
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        call("disarm", loss=lambda m: m["w"])
    with pytest.raises(ValueError, match="logits and prunable have different tree structures"):
        call("rloo", num=2, prunable={"v": True})


def test_bad_logits_samples_and_options_raise() -> None:
    # Each check below exists in the library but was never triggered; dropping one would let a
    # wrong call run silently (an int logit leaf, a half-sample count, decay = 1 dividing by 0).
    key = jax.random.key(0)
    total = lambda m: jnp.sum(m["w"])
    w3 = {"w": jnp.zeros((3,))}

    def call(fn: Any, logits: PyTree = w3, num: Any = 2, **kw: Any) -> None:
        jax.jit(lambda k: fn(total, logits, k, num, **kw).value)(key)

    with pytest.raises(ValueError, match="decay must lie in \\[0, 1\\), got 1.0"):
        est_lib.get_estimator("reinforce_ma", decay=1.0)
    with pytest.raises(ValueError, match="decay must lie in"):
        est_lib.get_estimator("reinforce", baseline="moving_average", decay=-0.1)
    with pytest.raises(ValueError, match="tau must be > 0, got -0.1"):  # direct: no registry check
        call(est_lib.relaxed_bernoulli, tau=-0.1)
    with pytest.raises(ValueError, match="unknown baseline 'mean'"):
        call(est_lib.reinforce, baseline="mean")
    with pytest.raises(ValueError, match="logits has no leaves"):
        call(est_lib.disarm, logits={})
    with pytest.raises(ValueError, match="logits leaf 'w' must be floating, got int32"):
        call(est_lib.disarm, logits={"w": jnp.zeros((3,), jnp.int32)})
    with pytest.raises(ValueError, match="prunable marks no leaf as prunable"):
        call(est_lib.straight_through, prunable={"w": False})
    with pytest.raises(ValueError, match="num_samples must be a Python int"):
        call(est_lib.disarm, num=2.5)
    with pytest.raises(ValueError, match="num_samples must be a Python int"):
        jax.jit(lambda n: est_lib.reinforce(total, w3, key, n).value)(4)  # traced: sets shapes
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        call(est_lib.disarm, num=0)
    with pytest.raises(ValueError, match="d = 3 prunable entries > max_dim = 2"):
        call(est_lib.get_estimator("exact", max_dim=2))  # the option is bound, not dropped
    # init follows the bound baseline option, not the registry name.
    ma = est_lib.get_estimator("reinforce", baseline="moving_average", decay=0.5)
    assert isinstance(ma.init(w3), est_lib.MovingAverageState)
    assert dict(ma.options) == {"baseline": "moving_average", "decay": 0.5}
    rloo = est_lib.get_estimator("reinforce_ma", baseline="rloo")
    assert isinstance(rloo.init(), est_lib.EmptyState)


def test_concrete_accepts_a_concrete_jax_array_tau_under_jit() -> None:
    # The tau check used float(np.min(tau)), which a jit around a concrete jax.Array tau staged.
    key = jax.random.key(0)
    est = est_lib.get_estimator("concrete", tau=jnp.asarray(LIN_TAU))  # passes the registry check
    got = jax.jit(lambda k: est(_linear_loss, {"w": LIN_S}, k, 1).value)(key)
    ref = est_lib.relaxed_bernoulli(_linear_loss, {"w": LIN_S}, key, 1, tau=LIN_TAU).value
    np.testing.assert_allclose(got, ref, rtol=1e-6)
