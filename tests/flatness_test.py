"""Flatness measures against exact answers on a 3-4-2 tanh MLP (full Hessian by jax.hessian)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxprune import flatness

N = 16  # examples in the fixed batch
DIM = 3 * 4 + 4 + 4 * 2 + 2  # 26 parameters


def init_mlp(key: jax.Array, dtype: jnp.dtype = jnp.float32) -> dict:
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "params": {
            "Dense_0": {
                "kernel": jax.random.normal(k1, (3, 4), dtype),
                "bias": 0.1 * jax.random.normal(k2, (4,), dtype),
            },
            "Dense_1": {
                "kernel": jax.random.normal(k3, (4, 2), dtype),
                "bias": 0.1 * jax.random.normal(k4, (2,), dtype),
            },
        }
    }


def example_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    p = params["params"]
    h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    logits = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    return -jax.nn.log_softmax(logits)[y]


@functools.partial(jax.jit, static_argnums=(1,))
def _problem_arrays(key: jax.Array, dtype: jnp.dtype) -> tuple:
    p_key, x_key, y_key = jax.random.split(key, 3)
    xs = jax.random.normal(x_key, (N, 3), dtype)
    ys = jax.random.bernoulli(y_key, 0.5, (N,)).astype(jnp.int32)
    return init_mlp(p_key, dtype), xs, ys


@functools.cache
def make_problem(seed: int = 0, dtype: jnp.dtype = jnp.float32) -> tuple:
    """(params, xs, ys, loss_fn); cached so every test reuses one closure and its compilations."""
    params, xs, ys = _problem_arrays(jax.random.key(seed), dtype)

    def loss_fn(p: dict) -> jax.Array:
        return jax.vmap(example_loss, in_axes=(None, 0, 0))(p, xs, ys).mean()

    return params, xs, ys, loss_fn


@functools.cache
def problem_hessian(dtype: jnp.dtype = jnp.float32) -> np.ndarray:
    """The exact 26 x 26 Hessian of the seed-0 problem by jax.hessian."""
    params, _, _, loss_fn = make_problem(0, dtype)
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda w: loss_fn(unravel(w))))(flat))


def make_mask(params: dict) -> dict:
    """Prunes 10 of the 26 coordinates, in both layers."""
    mask = jax.tree.map(jnp.ones_like, params)
    p = mask["params"]
    p["Dense_0"]["kernel"] = p["Dense_0"]["kernel"].at[0].set(0.0).at[2, :2].set(0.0)
    p["Dense_1"]["kernel"] = p["Dense_1"]["kernel"].at[1:3].set(0.0)
    return mask


def kept_index(params: dict, mask: dict) -> np.ndarray:
    flat_mask = np.asarray(
        ravel_pytree(jax.tree.map(lambda m, p: m.astype(p.dtype), mask, params))[0]
    )
    return np.flatnonzero(flat_mask)


def layer_index(params: dict, layer: str) -> np.ndarray:
    ones = jax.tree.map(jnp.ones_like, params)
    return kept_index(params, flatness.layer_masks(params, ones)[layer])


def test_layer_masks_group_leaves_by_parent_path():
    # Written out by hand: layer_index (used by the Hutch++ and covariance tests) is built from
    # layer_masks itself, so a wrong grouping there (e.g. by top-level key, or a bias put with the
    # next layer) would move both sides of those tests together. ravel_pytree order: Dense_0/bias
    # (4), Dense_0/kernel (12), Dense_1/bias (2), Dense_1/kernel (8).
    params, _, _, _ = make_problem(0, jnp.float32)
    mask = make_mask(params)
    flat_mask = np.asarray(ravel_pytree(mask)[0])
    for m, scale in ((None, np.ones(DIM)), (mask, flat_mask)):
        got = {k: np.asarray(ravel_pytree(v)[0])
               for k, v in flatness.layer_masks(params, m).items()}
        assert list(got) == ["params/Dense_0", "params/Dense_1"]
        first = (np.arange(DIM) < 16).astype(np.float32)
        np.testing.assert_array_equal(got["params/Dense_0"], first * scale)
        np.testing.assert_array_equal(got["params/Dense_1"], (1 - first) * scale)
    # Sequence indices and top-level leaves: "l" (leaf l[0]), "l/1" (l[1]["k"]), "w" (a leaf at
    # the root is its own group).
    tree = {"w": jnp.ones(2), "l": [jnp.ones(1), {"k": jnp.ones(3)}]}
    got = {k: np.asarray(ravel_pytree(v)[0]) for k, v in flatness.layer_masks(tree).items()}
    assert sorted(got) == ["l", "l/1", "w"]
    np.testing.assert_array_equal(got["l"], [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(got["l/1"], [0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(got["w"], [0, 0, 0, 0, 1, 1])
    regions = flatness.kept_pruned_masks(mask)
    np.testing.assert_array_equal(ravel_pytree(regions["pruned"])[0], 1 - flat_mask)


def test_hvp_matches_dense_hessian_with_and_without_mask():
    with jax.enable_x64(True):
        params, _, _, loss_fn = make_problem(0, jnp.float64)
        h = problem_hessian(jnp.float64)
        mask = make_mask(params)
        d = np.asarray(ravel_pytree(mask)[0])
        v = jax.random.normal(jax.random.key(1), (DIM,), jnp.float64)
        unravel = ravel_pytree(params)[1]
        f = jax.jit(lambda p, v, m: (flatness.hvp(loss_fn, p, v), flatness.hvp(loss_fn, p, v, m)))
        full, masked = f(params, unravel(v), mask)
        np.testing.assert_allclose(ravel_pytree(full)[0], h @ v, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(
            ravel_pytree(masked)[0], d * (h @ (d * v)), rtol=1e-10, atol=1e-12
        )


def test_hutchpp_exact_at_full_rank_per_layer_and_kept_pruned():
    # With 3k matvecs and k >= kept dimension, Q spans the kept space and Hutch++ is exact.
    with jax.enable_x64(True):
        params, _, _, loss_fn = make_problem(0, jnp.float64)
        h = problem_hessian(jnp.float64)
        mask = make_mask(params)
        regions = {
            "all": jax.tree.map(jnp.ones_like, params),
            **flatness.layer_masks(params),
            **flatness.kept_pruned_masks(mask),
            **{f"kept:{k}": m for k, m in flatness.layer_masks(params, mask).items()},
        }
        trace = jax.jit(
            lambda key, p, ms: flatness.by_region(
                lambda k, m: flatness.hutchpp_trace(k, loss_fn, p, 3 * DIM, m), key, ms
            )
        )
        got = trace(jax.random.key(0), params, regions)
        kept = kept_index(params, mask)
        pruned = np.setdiff1d(np.arange(DIM), kept)
        want = {"all": np.trace(h), "kept": np.trace(h[np.ix_(kept, kept)])}
        want["pruned"] = np.trace(h[np.ix_(pruned, pruned)])
        for layer in ("params/Dense_0", "params/Dense_1"):
            idx = layer_index(params, layer)
            want[layer] = np.trace(h[np.ix_(idx, idx)])
            both = np.intersect1d(idx, kept)
            want[f"kept:{layer}"] = np.trace(h[np.ix_(both, both)])
        assert set(got) == set(want)
        for name, value in want.items():
            np.testing.assert_allclose(got[name].estimate, value, rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(
            want["params/Dense_0"] + want["params/Dense_1"], want["all"], rtol=1e-12
        )


def test_lanczos_top_eigenpairs_match_exact_with_and_without_mask():
    with jax.enable_x64(True):
        params, _, _, loss_fn = make_problem(0, jnp.float64)
        h = problem_hessian(jnp.float64)
        mask = make_mask(params)
        ones = jax.tree.map(jnp.ones_like, params)
        kept = kept_index(params, mask)
        # One compilation, masks as data. num_iters = DIM exhausts the 16-dim kept space, which
        # exercises the restarts and the zero rows.
        lanczos = jax.jit(
            lambda key, m: (
                flatness.lanczos_eigenpairs(key, loss_fn, params, DIM, DIM, m),
                # unroll=3 (not a divisor of DIM) must not change the numbers.
                flatness.lanczos_eigenpairs(
                    key, loss_fn, params, 5, DIM, m, largest_magnitude=True, unroll=3
                ),
            )
        )
        (full, top_mag), (masked, _) = (
            lanczos(jax.random.key(3), ones),
            lanczos(jax.random.key(3), mask),
        )
        exact = np.linalg.eigvalsh(h)[::-1]
        np.testing.assert_allclose(full.eigenvalues, exact, atol=1e-5)
        np.testing.assert_allclose(
            top_mag.eigenvalues, exact[np.argsort(-np.abs(exact))][:5], atol=1e-5
        )
        vecs = jax.vmap(lambda t: ravel_pytree(t)[0])(full.eigenvectors)[:5]
        np.testing.assert_allclose(vecs @ h, full.eigenvalues[:5, None] * vecs, atol=1e-6)
        np.testing.assert_allclose(vecs @ vecs.T, np.eye(5), atol=1e-8)
        sub = np.linalg.eigvalsh(h[np.ix_(kept, kept)])
        exact_masked = np.sort(np.concatenate([sub, np.zeros(DIM - kept.size)]))[::-1]
        np.testing.assert_allclose(masked.eigenvalues, exact_masked, atol=1e-5)
        np.testing.assert_allclose(masked.eigenvalues.sum(), sub.sum(), rtol=1e-9)


def test_power_iteration_on_quadratic_with_known_spectrum():
    # Eigenvalue ratios of 10 make 20 steps and the 1e-4 stopping rule accurate to ~1e-6.
    with jax.enable_x64(True):
        spectrum = np.array([100.0, 10.0, 1.0, 0.1, 0.01, 0.001])
        q, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(6, 6)))
        a = jnp.asarray((q * spectrum[None, :]) @ q.T)
        loss_fn = lambda p: 0.5 * p["w"] @ a @ p["w"]
        params = {"w": jnp.zeros((6,), jnp.float64)}
        power = jax.jit(
            lambda key: (
                flatness.power_iteration_eigenpairs(key, loss_fn, params, 3),
                flatness.top_k_eigenvalue_trace(key, loss_fn, params, k=3),
            )
        )
        pairs, trace = power(jax.random.key(5))
        np.testing.assert_allclose(pairs.eigenvalues, spectrum[:3], rtol=1e-5)
        np.testing.assert_allclose(np.abs(pairs.eigenvectors["w"] @ q[:, :3]), np.eye(3), atol=1e-3)
        np.testing.assert_allclose(trace, 111.0, rtol=1e-5)


def test_power_iteration_and_top_k_trace_respect_the_mask():
    # Block-diagonal quadratic: the kept block (coordinates 0-2) has spectrum 50, 5, 0.5, the
    # pruned block a larger 1000, 100, 10 (ratios of 10, as above). A mask dropped anywhere (also
    # in top_k_eigenvalue_trace's forwarding) lets 1000 through; pruned coordinates of the
    # vectors must be exactly 0.
    with jax.enable_x64(True):
        rng = np.random.default_rng(6)
        blocks = []
        for spectrum in ([50.0, 5.0, 0.5], [1000.0, 100.0, 10.0]):
            q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
            blocks.append((q * np.array(spectrum)[None, :]) @ q.T)
        a = jnp.asarray(np.block([[blocks[0], np.zeros((3, 3))], [np.zeros((3, 3)), blocks[1]]]))
        loss_fn = lambda p: 0.5 * p["w"] @ a @ p["w"]
        params = {"w": jnp.zeros((6,), jnp.float64)}
        mask = {"w": jnp.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])}
        power = jax.jit(
            lambda key, m: (
                flatness.power_iteration_eigenpairs(key, loss_fn, params, 3, mask=m),
                flatness.top_k_eigenvalue_trace(key, loss_fn, params, k=3, mask=m),
            )
        )
        pairs, trace = power(jax.random.key(5), mask)
        np.testing.assert_allclose(pairs.eigenvalues, [50.0, 5.0, 0.5], rtol=1e-5)
        np.testing.assert_array_equal(pairs.eigenvectors["w"][:, 3:], 0.0)
        np.testing.assert_allclose(trace, 55.5, rtol=1e-5)
        _, unmasked = power(jax.random.key(5), jax.tree.map(jnp.ones_like, mask))
        np.testing.assert_allclose(unmasked, 1000.0 + 100.0 + 50.0, rtol=1e-5)


@functools.cache
def hutchinson_trials(num_probes: int):
    """jit(vmap over 256 keys) of Hutchinson on the seed-0 problem; the mask is an argument."""
    params, _, _, loss_fn = make_problem(0, jnp.float32)
    f = lambda k, m: flatness.hutchinson_trace(k, loss_fn, params, num_probes, m)
    return jax.jit(lambda key, m: jax.vmap(f, in_axes=(0, None))(jax.random.split(key, 256), m))


def test_hutchinson_error_shrinks_like_inverse_sqrt_probes_and_stderr_covers_truth():
    params, _, _, _ = make_problem(0, jnp.float32)
    ones = jax.tree.map(jnp.ones_like, params)
    h = problem_hessian()
    truth = np.trace(h)
    per_probe_var = 2.0 * (np.sum(h**2) - np.sum(np.diag(h) ** 2))  # Rademacher variance
    rms = {}
    for p in (4, 64):
        est = hutchinson_trials(p)(jax.random.key(p), ones)
        err = np.asarray(est.estimate) - truth
        rms[p] = np.sqrt(np.mean(err**2))
        np.testing.assert_allclose(rms[p], np.sqrt(per_probe_var / p), rtol=0.2)
        if p == 64:
            covered = np.mean(np.abs(err) <= 2.0 * np.asarray(est.stderr))
            assert covered >= 0.88, covered
            # Coverage alone passes an inflated stderr (e.g. sd without / sqrt(num_probes)): the
            # squared stderr times p is an unbiased estimate of the per-probe variance. Its mean
            # over 256 trials has a relative sd of ~1.7% (measured over 6 seeds), so 10% is ~6
            # sigma; a missing or doubled sqrt(64) is off by 64x.
            np.testing.assert_allclose(
                np.mean(np.asarray(est.stderr) ** 2) * p, per_probe_var, rtol=0.1
            )
    assert 3.0 < rms[4] / rms[64] < 5.3  # sqrt(16) = 4


def test_hutchpp_below_full_rank_is_unbiased_and_beats_hutchinson():
    # k = 8 < 26: the Hutchinson residual term is non-zero (at full rank it vanishes, so the exact
    # test above cannot see it). 256 trials: pooled mean within 4 standard errors of Tr(H). A
    # residual from the sketch probes S instead of fresh G (correlated with Q) is biased by 5.3
    # pooled standard errors (measured); a residual left unprojected (Tr(Q^T H Q) counted twice)
    # by far more.
    params, _, _, loss_fn = make_problem(0, jnp.float32)
    h = problem_hessian()
    truth = np.trace(h)
    trials = jax.jit(
        lambda key: jax.vmap(lambda k: flatness.hutchpp_trace(k, loss_fn, params, 24))(
            jax.random.split(key, 256)
        )
    )
    est = trials(jax.random.key(11))
    e = np.asarray(est.estimate)
    assert abs(e.mean() - truth) < 4.0 * e.std() / np.sqrt(256), (e.mean(), truth)
    # Hutchinson with the same 24 matvecs has rms sqrt(per-probe var / 24) = 0.31; Hutch++ measured
    # 0.080 on this fast-decaying spectrum.
    per_probe_var = 2.0 * (np.sum(h**2) - np.sum(np.diag(h) ** 2))
    assert np.sqrt(np.mean((e - truth) ** 2)) < 0.5 * np.sqrt(per_probe_var / 24)
    # The reported stderr covers the residual term only (Q's randomness is left out), so it sits a
    # little below the true sd: measured 0.89 of it. sqrt(3k) instead of sqrt(k) would give 0.51.
    assert 0.7 < np.mean(np.asarray(est.stderr)) / e.std() < 1.1


def test_masked_hutchinson_is_unbiased_for_masked_sub_hessian_trace():
    params, _, _, _ = make_problem(0, jnp.float32)
    h = problem_hessian()
    mask = make_mask(params)
    kept = kept_index(params, mask)
    est = hutchinson_trials(64)(jax.random.key(7), mask)
    pooled, pooled_se = np.mean(est.estimate), np.std(est.estimate) / np.sqrt(256)
    assert abs(pooled - np.trace(h[np.ix_(kept, kept)])) < 4.0 * pooled_se


def python_loop_grads(params: dict, xs, ys) -> np.ndarray:
    grad = jax.jit(jax.grad(example_loss))
    return np.stack([np.asarray(ravel_pytree(grad(params, xs[i], ys[i]))[0]) for i in range(N)])


def test_covariance_traces_match_per_example_loop():
    params, xs, ys, _ = make_problem(0, jnp.float32)
    g = python_loop_grads(params, xs, ys).astype(np.float64)
    mask = make_mask(params)

    @jax.jit
    def traces(p, m):
        moments = flatness.gradient_moments(example_loss, p, xs, ys, batch_size=4)
        regions = {"all": None, **flatness.kept_pruned_masks(m), **flatness.layer_masks(p)}
        return {k: flatness.covariance_trace(moments, r) for k, r in regions.items()}

    got = traces(params, mask)
    kept = kept_index(params, mask)
    index = {"all": np.arange(DIM), "kept": kept, "pruned": np.setdiff1d(np.arange(DIM), kept)}
    for layer in ("params/Dense_0", "params/Dense_1"):
        index[layer] = layer_index(params, layer)
    for name, idx in index.items():
        gi = g[:, idx]
        np.testing.assert_allclose(got[name].uncentred, np.mean(np.sum(gi**2, 1)), rtol=1e-5)
        centred = np.mean(np.sum((gi - gi.mean(0)) ** 2, 1))
        np.testing.assert_allclose(got[name].centred, centred, rtol=1e-4)
    pe = jax.jit(flatness.per_example_grads, static_argnums=0)(example_loss, params, xs, ys)
    np.testing.assert_allclose(jax.vmap(lambda t: ravel_pytree(t)[0])(pe), g, rtol=1e-5, atol=1e-6)


def test_tic_matches_dense_solve_with_and_without_mask():
    with jax.enable_x64(True):
        params, xs, ys, loss_fn = make_problem(0, jnp.float64)
        h = problem_hessian(jnp.float64)
        g = python_loop_grads(params, xs, ys)
        damping = max(0.0, -np.linalg.eigvalsh(h)[0]) + 0.05  # H + lambda I positive definite
        mask = make_mask(params)
        kept = kept_index(params, mask)
        ones = jax.tree.map(jnp.ones_like, params)
        tic = jax.jit(
            lambda m: flatness.tic_trace(
                loss_fn,
                example_loss,
                params,
                xs,
                ys,
                damping,
                m,
                batch_size=8,
                tol=1e-10,
                maxiter=200,
            )
        )
        full, masked = tic(ones), tic(mask)
        c = g.T @ g / N
        want = np.trace(np.linalg.solve(h + damping * np.eye(DIM), c))
        np.testing.assert_allclose(full, want, rtol=1e-8)
        sub = np.ix_(kept, kept)
        want_masked = np.trace(np.linalg.solve(h[sub] + damping * np.eye(kept.size), c[sub]))
        np.testing.assert_allclose(masked, want_masked, rtol=1e-8)
        np.testing.assert_allclose(flatness.tic_proxy(6.0, 3.0), 2.0)


def test_epsilon_sharpness_on_quadratic_with_known_answer():
    # loss = 0.5 a w^2 + b w at w = 0: along +-e_i the increase is 0.5 a_i eps^2 +- b_i eps = 0.1.
    a, b = jnp.array([8.0, 2.0]), jnp.array([0.5, 0.0])
    loss_fn = lambda p: jnp.sum(0.5 * a * p["w"] ** 2 + b * p["w"])
    params = {"w": jnp.zeros((2,))}
    directions = {"w": jnp.eye(2)}
    sharp = jax.jit(
        lambda p, d: (
            flatness.epsilon_sharpness(loss_fn, p, d),
            flatness.epsilon_sharpness(loss_fn, p, d, bisection_steps=30),
        )
    )
    grid, bisected = sharp(params, directions)
    root = lambda a_, b_: (-b_ + np.sqrt(b_**2 + 0.2 * a_)) / a_
    exact = np.array([[root(8.0, 0.5), root(8.0, -0.5)], [root(2.0, 0.0), root(2.0, 0.0)]])
    np.testing.assert_allclose(bisected.per_direction, exact, rtol=1e-5)
    np.testing.assert_allclose(grid.per_direction, np.ceil(exact * 100 - 1e-6) / 100, atol=1e-6)
    np.testing.assert_allclose(grid.epsilon, 0.11, atol=1e-6)
    np.testing.assert_allclose(bisected.epsilon, root(8.0, 0.5), rtol=1e-5)
    # The whole grid: radii 0.01 .. 0.40 (not from 0, not past the radius) and the increases
    # 0.5 a r^2 +- b r, column 0 = +eps. A crossing-only check misses a wrong grid value past the
    # first crossing.
    r = 0.01 * np.arange(1, 41)
    np.testing.assert_allclose(grid.radii, r, rtol=1e-6)
    want = 0.5 * np.asarray(a)[:, None, None] * r**2 + np.array([1.0, -1.0])[None, :, None] * (
        np.asarray(b)[:, None, None] * r)
    np.testing.assert_allclose(grid.loss_increase, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bisected.loss_increase, want, rtol=1e-5, atol=1e-7)
    # base_loss replaces loss(w) = 0: with base -0.05 every increase is 0.05 larger, so the
    # threshold 0.1 is reached where 0.5 a eps^2 +- b eps = 0.05 (a base_loss ignored keeps 0.1).
    shifted = jax.jit(lambda p, d: flatness.epsilon_sharpness(
        loss_fn, p, d, bisection_steps=30, base_loss=-0.05))(params, directions)
    root05 = lambda a_, b_: (-b_ + np.sqrt(b_**2 + 0.1 * a_)) / a_
    exact05 = np.array([[root05(8.0, 0.5), root05(8.0, -0.5)], [root05(2.0, 0.0)] * 2])
    np.testing.assert_allclose(shifted.per_direction, exact05, rtol=1e-5)
    flat_loss = jax.jit(lambda p, d: flatness.epsilon_sharpness(lambda q: 0.0 * q["w"].sum(), p, d))
    assert np.isinf(flat_loss(params, directions).epsilon)


def test_vmapped_seeds_match_single_seed_runs():
    seeds = [make_problem(seed, jnp.float32) for seed in (0, 1)]
    loss_of = lambda xs, ys: (
        lambda p: jax.vmap(example_loss, in_axes=(None, 0, 0))(p, xs, ys).mean()
    )
    _, xs, ys, _ = seeds[0]
    loss_fn = loss_of(xs, ys)

    def measures(key: jax.Array, params: dict) -> tuple:
        # Lanczos is a fixed fori_loop; power iteration's data-dependent while_loop is the risky
        # one under vmap.
        k1, k2 = jax.random.split(key)
        moments = flatness.gradient_moments(example_loss, params, xs, ys)
        return (
            flatness.hutchinson_trace(k1, loss_fn, params, 8),
            flatness.power_iteration_eigenpairs(k2, loss_fn, params, 2).eigenvalues,
            flatness.covariance_trace(moments),
        )

    keys = jax.random.split(jax.random.key(0), 2)
    params_s = jax.tree.map(lambda *xs: jnp.stack(xs), *(s[0] for s in seeds))
    batched = jax.jit(jax.vmap(measures))(keys, params_s)
    single = jax.jit(measures)
    singles = [single(keys[i], seeds[i][0]) for i in range(2)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *singles)
    chex.assert_trees_all_close(batched, stacked, rtol=1e-4, atol=1e-5)


def test_batch_size_chunking_leaves_estimates_unchanged():
    # batch_size switches _map from vmap to lax.map in chunks (3 does not divide 8 probes, 24
    # matvecs or the 2 x 2 x 40 sharpness grid, so the remainder chunk runs too). Same keys, same
    # probes: the numbers agree to float32 rounding. Catches a chunking that drops or reorders
    # the remainder (sharpness reshapes the flat grid back to (k, 2, n)).
    params, _, _, loss_fn = make_problem(0, jnp.float32)
    norm = jnp.linalg.norm(ravel_pytree(params)[0])
    dirs = jax.tree.map(lambda p: jnp.stack([p, -2.0 * p]) / norm, params)

    @jax.jit
    def run(key):
        out = {}
        for name, b in (("vmap", None), ("chunked", 3)):
            out[name] = (
                flatness.hutchinson_trace(key, loss_fn, params, 8, batch_size=b),
                flatness.hutchpp_trace(key, loss_fn, params, 24, batch_size=b),
                flatness.epsilon_sharpness(loss_fn, params, dirs, 0.05, batch_size=b),
            )
        return out

    out = run(jax.random.key(2))
    chex.assert_trees_all_close(out["chunked"], out["vmap"], rtol=1e-5, atol=1e-6)
    # Not vacuous: the grid shows a real increase somewhere and differs across directions.
    increase = np.asarray(out["vmap"][2].loss_increase)
    assert increase.max() > 0.05 and not np.allclose(increase[0], increase[1])


def _quadratic_sharpness(radius: float, step: float) -> flatness.Sharpness:
    """Shapes of epsilon_sharpness of sum(w^2) at w = 0 along e_1, e_2 (traced, never run)."""
    loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    return jax.eval_shape(
        lambda: flatness.epsilon_sharpness(
            loss_fn, {"w": jnp.zeros((2,))}, {"w": jnp.eye(2)}, radius=radius, step=step
        )
    )


def _bad_bias(mask: dict) -> dict:
    """make_mask's tree with a (3,) Dense_1 bias where params has (2,)."""
    mask["params"]["Dense_1"]["bias"] = jnp.ones((3,))
    return mask


def _case(id_, call, match):
    return pytest.param(call, match, id=id_)


@pytest.mark.parametrize(
    "call,match",
    [
        _case("hutchpp-num_matvecs=5",
              lambda p, xs, ys, f, m: flatness.hutchpp_trace(jax.random.key(0), f, p, 5),
              r"num_matvecs must be >= 6.*got 5"),
        _case("lanczos-k=0",
              lambda p, xs, ys, f, m: flatness.lanczos_eigenpairs(jax.random.key(0), f, p, 0, 4),
              r"need 1 <= k <= num_iters, got k=0"),
        _case("lanczos-k>num_iters",
              lambda p, xs, ys, f, m: flatness.lanczos_eigenpairs(jax.random.key(0), f, p, 5, 4),
              r"need 1 <= k <= num_iters, got k=5, num_iters=4"),
        _case("power-k=0",
              lambda p, xs, ys, f, m: flatness.power_iteration_eigenpairs(
                  jax.random.key(0), f, p, 0),
              r"k must be >= 1, got 0"),
        _case("sharpness-radius<step", lambda p, xs, ys, f, m: _quadratic_sharpness(0.004, 0.01),
              r"radius=0.004 must be at least step=0.01"),
        # With round(0.006 / 0.01) = 1 the grid was [0.01], beyond the radius asked for.
        _case("sharpness-radius=0.6step", lambda p, xs, ys, f, m: _quadratic_sharpness(0.006, 0.01),
              r"radius=0.006 must be at least step=0.01"),
        _case("sharpness-directions-shape",
              lambda p, xs, ys, f, m: flatness.epsilon_sharpness(
                  f, p, jax.tree.map(lambda a: jnp.stack([a.reshape(-1)[:3]] * 2), p)),
              "directions must be params-shaped"),
        _case("moments-ys-short",
              lambda p, xs, ys, f, m: flatness.gradient_moments(example_loss, p, xs, ys[:-1]),
              r"xs and ys leaves must share their leading \(example\) axis, got \{1[56], 1[56]\}"),
        _case("moments-xs-tree",
              lambda p, xs, ys, f, m: flatness.gradient_moments(
                  example_loss, p, (xs, xs[:8]), ys),
              "xs and ys leaves must share"),
        _case("tic-xs-short",
              lambda p, xs, ys, f, m: flatness.tic_trace(f, example_loss, p, xs[:-1], ys, 0.1),
              "xs and ys leaves must share"),
        _case("moments-batch_size=0",
              lambda p, xs, ys, f, m: flatness.gradient_moments(example_loss, p, xs, ys, 0),
              "batch_size=0 must be positive and divide n=16"),
        _case("hutchinson-mask-leaf-shape",
              lambda p, xs, ys, f, m: flatness.hutchinson_trace(
                  jax.random.key(0), f, p, 4, _bad_bias(m)),
              r"mask leaf \['params'\]\['Dense_1'\]\['bias'\] has shape \(3,\), params leaf "
              r"has shape \(2,\)"),
        _case("layer_masks-mask-leaf-shape",
              lambda p, xs, ys, f, m: flatness.layer_masks(p, _bad_bias(m)),
              r"Dense_1.*bias.*\(3,\)"),
        _case("hvp-mask-structure",
              lambda p, xs, ys, f, m: flatness.hvp(f, p, p, {"params": m["params"]["Dense_0"]}),
              "mask structure"),
        _case("hutchinson-num_probes=1",
              lambda p, xs, ys, f, m: flatness.hutchinson_trace(jax.random.key(0), f, p, 1),
              r"num_probes must be >= 2 for a standard error, got 1"),
        _case("lanczos-num_iters>dim",
              lambda p, xs, ys, f, m: flatness.lanczos_eigenpairs(
                  jax.random.key(0), f, p, 2, DIM + 1),
              rf"num_iters={DIM + 1} exceeds the number of parameters {DIM}"),
        _case("moments-batch_size=5",
              lambda p, xs, ys, f, m: flatness.gradient_moments(example_loss, p, xs, ys, 5),
              "batch_size=5 must be positive and divide n=16"),
        _case("tic-batch_size=3",
              lambda p, xs, ys, f, m: flatness.tic_trace(
                  f, example_loss, p, xs, ys, 0.1, batch_size=3),
              "batch_size=3 must be positive and divide n=16"),
        _case("covariance-mask-structure",
              lambda p, xs, ys, f, m: flatness.covariance_trace(
                  flatness.GradientMoments(p, p, N), {"params": m["params"]["Dense_0"]}),
              "mask structure"),
    ],
)
def test_bad_arguments_raise(call, match):
    # Every check runs before any HVP or gradient is traced.
    params, xs, ys, loss_fn = make_problem(0, jnp.float32)
    with pytest.raises(ValueError, match=match):
        call(params, xs, ys, loss_fn, make_mask(params))


def test_argument_boundaries_are_accepted():
    # The smallest valid values pass (an off-by-one in a check would reject them): traced with
    # eval_shape, nothing compiled or run.
    params, xs, ys, loss_fn = make_problem(0, jnp.float32)
    key = jax.random.key(0)
    out = jax.eval_shape(lambda k: flatness.hutchpp_trace(k, loss_fn, params, 6), key)
    assert out.estimate.shape == () and out.stderr.shape == ()
    out = jax.eval_shape(lambda k: flatness.lanczos_eigenpairs(k, loss_fn, params, 1, 1), key)
    assert out.eigenvalues.shape == (1,)
    out = _quadratic_sharpness(0.01, 0.01)
    assert out.radii.shape == (1,) and out.loss_increase.shape == (2, 2, 1)
    out = jax.eval_shape(lambda: flatness.gradient_moments(example_loss, params, xs, ys, 16))
    assert jax.tree.map(lambda a: a.shape, out.mean) == jax.tree.map(jnp.shape, params)
