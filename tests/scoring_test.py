"""Scores, S/R/L selection, stability arithmetic and noise injection on hand-built arrays."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy import stats as sps

from jaxprune import schedules, scoring

S, R, L = scoring.SMALLEST, scoring.RANDOM, scoring.LARGEST

# Filter 3 (the smallest score) and filter 6 (the largest) are already pruned and must be skipped.
SCORES = np.array([0.5, 0.1, 0.9, 0.05, 0.7, 0.2, 1.0, 0.3], np.float32)
ALIVE = np.array([1, 1, 1, 0, 1, 1, 0, 1], bool)

select_jit = jax.jit(scoring.select)


def test_filter_norms_hwio():
    kernel = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4) - 20.0
    w = np.asarray(kernel).reshape(-1, 4)
    np.testing.assert_allclose(
        jax.jit(scoring.l2_score)(kernel), np.linalg.norm(w, axis=0), rtol=1e-6
    )
    np.testing.assert_allclose(jax.jit(scoring.l1_score)(kernel), np.abs(w).sum(0), rtol=1e-6)
    with pytest.raises(ValueError, match="ord"):
        scoring.filter_norm(kernel, 3)


def test_activation_ema_updates_every_10th_batch():
    acts = np.random.default_rng(1).normal(size=(25, 2, 3, 3, 4)).astype(np.float32)  # NHWC

    @jax.jit
    def run(acts):
        def body(state, a):
            state = scoring.activation_ema_update(state, a)
            return state, state.score

        return jax.lax.scan(body, scoring.activation_ema_init(4), acts)

    state, history = run(acts)
    expected, hist = np.zeros(4), []
    for t in range(25):
        if (t + 1) % 10 == 0:  # the reference increments the counter first, then checks % 10
            expected = 0.1 * np.abs(np.asarray(acts[t])).sum((0, 1, 2)) + 0.9 * expected
        hist.append(expected)
    np.testing.assert_allclose(history, np.array(hist), rtol=1e-5)
    assert int(state.count) == 25 and np.all(np.asarray(history[8]) == 0)
    with pytest.raises(ValueError, match="channels"):
        scoring.activation_ema_update(scoring.activation_ema_init(3), acts[0])


GAMMA_BETA = [(1.0, 0.0), (0.5, 0.3), (2.0, -1.0), (-1.5, 0.7), (0.1, -0.4), (3.0, 2.5)]


def test_ebn_matches_numerical_integration():
    g, b = (np.array(v, np.float32) for v in zip(*GAMMA_BETA))
    got = np.asarray(jax.jit(scoring.ebn_score)(g, b))
    for (gamma, beta), e in zip(GAMMA_BETA, got):
        quad, _ = integrate.quad(
            lambda z: max(0.0, gamma * z + beta) * sps.norm.pdf(z),
            -12,
            12,
            points=[-beta / gamma],
            limit=200,
        )
        assert e == pytest.approx(quad, rel=1e-5, abs=1e-6)


def test_ebn_signed_variant_and_gamma_zero():
    g = np.array([1.0, -1.0, -2.0, 0.0, 0.0, 0.0], np.float32)
    b = np.array([0.5, 0.5, -0.3, 0.7, -0.7, 0.0], np.float32)
    signed = np.asarray(jax.jit(lambda g, b: scoring.ebn_score(g, b, signed=True))(g, b))
    # The reference's EBN_alt: alpha = -b/g, Z = 1 - Phi(alpha), E = Z (b + phi(alpha) / Z g).
    for gi, bi, e in zip(np.asarray(g)[:3], np.asarray(b)[:3], signed[:3]):
        alpha = -bi / gi
        z = 1 - sps.norm.cdf(alpha)
        assert e == pytest.approx(z * (bi + sps.norm.pdf(alpha) / z * gi), rel=1e-5)
    assert (
        signed[1] < 0
    )  # negative gamma: scored below any channel with |gamma| (pruned first by S)
    np.testing.assert_allclose(signed[3:], [0.7, 0.0, 0.0])  # gamma = 0: relu(beta), no NaN
    unsigned = np.asarray(jax.jit(scoring.ebn_score)(g, b))
    np.testing.assert_allclose(unsigned[1], unsigned[0], rtol=1e-6)
    np.testing.assert_allclose(unsigned[3:], [0.7, 0.0, 0.0])


@pytest.mark.parametrize(
    "target,k,pruned",
    [
        (S, 3, [1, 5, 7]),  # 0.1, 0.2, 0.3; the dead 0.05 is skipped
        (L, 3, [2, 4, 0]),  # 0.9, 0.7, 0.5; the dead 1.0 is skipped
        (S, 0, []),
        (L, 1, [2]),
        (
            S,
            9,
            [0, 1, 2, 4, 5, 7],
        ),  # k beyond the alive count prunes every alive filter, nothing else
    ],
)
def test_select_smallest_largest_exact(key, target, k, pruned):
    sel = select_jit(key, SCORES, ALIVE, k, target)
    expected = np.zeros(8, bool)
    expected[pruned] = True
    np.testing.assert_array_equal(sel.pruned, expected)
    np.testing.assert_array_equal(sel.alive, np.asarray(ALIVE) & ~expected)
    if pruned:
        assert float(sel.mean_pruned_score) == pytest.approx(
            float(np.mean(np.asarray(SCORES)[pruned]))
        )
    else:
        assert np.isnan(sel.mean_pruned_score)


def test_select_ties_break_by_index(key):
    sel = select_jit(key, np.ones(5, np.float32), np.ones(5, bool), 2, S)
    np.testing.assert_array_equal(sel.pruned, [1, 1, 0, 0, 0])


def test_random_target_exact_k_reproducible_and_uniform(key):
    a = select_jit(key, SCORES, ALIVE, 3, R)
    b = select_jit(key, SCORES, ALIVE, 3, R)
    np.testing.assert_array_equal(a.pruned, b.pruned)
    keys = jax.random.split(jax.random.key(7), 4000)
    pruned = jax.jit(jax.vmap(lambda k: scoring.select(k, SCORES, ALIVE, 3, R).pruned))(keys)
    assert np.all(np.asarray(pruned).sum(1) == 3)
    assert not np.any(np.asarray(pruned)[:, [3, 6]])
    freq = np.asarray(pruned).mean(0)[np.asarray(ALIVE)]  # each alive filter w.p. 3/6
    np.testing.assert_allclose(freq, 0.5, atol=4 * math.sqrt(0.25 / 4000))
    assert len({tuple(np.flatnonzero(p)) for p in np.asarray(pruned)[:50]}) > 5


def test_vmapped_sweep_over_targets_and_k_equals_separate_calls(key):
    targets = np.array([S, R, L, S, R, L])
    ks = np.array([1, 1, 1, 4, 4, 4])
    keys = jax.random.split(key, 6)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def sweep(keys, ks, targets):
        return jax.vmap(scoring.select, in_axes=(0, None, None, 0, 0))(
            keys, SCORES, ALIVE, ks, targets
        )

    batched = sweep(keys, ks, targets)
    singles = [select_jit(keys[i], SCORES, ALIVE, int(ks[i]), int(targets[i])) for i in range(6)]
    chex.assert_trees_all_equal(batched, jax.tree.map(lambda *x: jnp.stack(x), *singles))


def test_select_layers_uses_one_key_per_layer(key):
    scores = {"b": SCORES, "a": SCORES}
    alive = {"a": ALIVE, "b": ALIVE}

    @jax.jit
    def both(key):
        out = scoring.select_layers(key, scores, alive, {"a": 2, "b": 2}, R)
        return out["b"].pruned, scoring.select(
            jax.random.fold_in(key, 1), SCORES, ALIVE, 2, R
        ).pruned

    got, ref = both(key)
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(ValueError, match="same layers"):
        scoring.select_layers(key, scores, alive, {"a": 2}, R)
    assert scoring.target_code("L") == L and scoring.target_code("random") == R
    with pytest.raises(ValueError, match="target"):
        scoring.target_code("medium")


def test_instability_and_mean_stability():
    assert float(scoring.instability(0.80, 0.72)) == pytest.approx(0.1)
    t_pre = np.array([0.5, 0.80, 0.90, 0.85, 0.86], np.float32)
    t_post = np.array([0.5, 0.72, 0.90, 0.68, 0.86], np.float32)
    is_event = np.array([False, True, True, True, False])
    ms = jax.jit(scoring.mean_stability)
    # Instabilities 0.1, 0, 0.2 -> mean 0.1 -> 90 %.
    assert float(ms(t_pre, t_post, is_event)) == pytest.approx(90.0, rel=1e-6)
    assert float(ms(t_pre, t_post, np.zeros(5, bool))) == 100.0
    seeds = jax.vmap(ms, in_axes=(0, 0, None))(
        np.stack([t_pre, t_pre]), np.stack([t_post, t_pre]), is_event
    )
    np.testing.assert_allclose(seeds, [90.0, 100.0], rtol=1e-6)


def test_generalization_best_after_last_pruning_epoch():
    test = np.array([0.90, 0.70, 0.80, 0.85, 0.84], np.float32)
    train = np.array([0.91, 0.75, 0.90, 1.00, 1.00], np.float32)
    g = jax.jit(scoring.generalization)(test, train, 2)
    assert int(g.best_epoch) == 3 and float(g.best_test) == pytest.approx(0.85)
    assert float(g.gap) == pytest.approx(0.15)
    assert int(jax.jit(scoring.generalization)(test, train, -1).best_epoch) == 0


def _layer():
    rng = np.random.default_rng(0)
    return {
        "kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
        "scale": (1 + rng.normal(size=4)).astype(np.float32),
        "bias": rng.normal(size=4).astype(np.float32),
    }


def test_zeroing_then_restore_is_bit_exact():
    layer = _layer()
    targeted = np.array([True, False, True, False])
    zeroed, saved = jax.jit(scoring.temporary_zero)(layer, targeted)
    assert all(np.all(np.asarray(x)[..., [0, 2]] == 0) for x in jax.tree.leaves(zeroed))
    # Some training inside the window changes every weight, the zeroed ones included.
    trained = jax.tree.map(
        lambda x: np.asarray(x) + np.float32(0.1) * np.cos(np.asarray(x) + 1), zeroed
    )
    end = jax.jit(jax.vmap(scoring.end_zeroing, in_axes=(None, None, None, 0)))
    back = end(trained, saved, targeted, np.array([True, False]))
    for name in layer:
        old, new, got = (np.asarray(t[name]) for t in (layer, trained, back))
        np.testing.assert_array_equal(
            got[0][..., [0, 2]], old[..., [0, 2]]
        )  # restored, bit for bit
        np.testing.assert_array_equal(got[1][..., [0, 2]], 0.0)  # returned at zero
        np.testing.assert_array_equal(got[:, ..., [1, 3]], np.stack([new, new])[..., [1, 3]])


def test_gaussian_noise_has_std_of_unperturbed_weights(key):
    kernel = 0.3 * np.random.default_rng(2).normal(size=(3, 3, 16, 64)).astype(np.float32)
    targeted = np.arange(64) % 2 == 0
    alive = np.arange(64) < 60

    @jax.jit
    def perturb(key, kernel):  # one program: sigma from the unperturbed filters, then the noise
        std = scoring.unperturbed_std(kernel, alive & ~targeted)
        return std, scoring.add_channel_noise(key, {"kernel": kernel}, targeted, std)["kernel"]

    std, noisy = perturb(key, kernel)
    ref = kernel[..., alive & ~targeted]
    assert float(std) == pytest.approx(float(ref.std()), rel=1e-5)
    diff = np.asarray(noisy) - kernel
    np.testing.assert_array_equal(diff[..., ~np.asarray(targeted)], 0.0)
    d = diff[..., np.asarray(targeted)].ravel()  # 4608 draws: sd of the sample std ~ 1 %
    assert d.std() == pytest.approx(float(std), rel=0.05)
    assert abs(d.mean()) < 4 * float(std) / math.sqrt(d.size)


def test_permanent_prune_and_window():
    layer = _layer()
    targeted = np.array([False, True, False, False])
    pruned, alive = jax.jit(scoring.permanent_prune)(layer, np.ones(4, bool), targeted)
    np.testing.assert_array_equal(alive, [True, False, True, True])
    assert all(np.all(np.asarray(x)[..., 1] == 0) for x in jax.tree.leaves(pruned))
    window = scoring.open_window(targeted, 3)
    active, closing = [], []
    tick = jax.jit(scoring.window_tick)
    for _ in range(5):
        window, a, c = tick(window)
        active.append(bool(a))
        closing.append(bool(c))
    assert active == [True, True, True, False, False]
    assert closing == [False, False, True, False, False]
    with pytest.raises(ValueError, match="channels last"):
        scoring.zero_channels({"kernel": np.ones((3, 3, 2, 5))}, targeted)


def test_whole_target_by_rate_sweep_runs_in_one_program(key):
    """Scan the pruning events of 2 layers over 12 epochs for 2 periods x 3 targets, vmapped."""
    rng = np.random.default_rng(3)
    scores = rng.permutation(16).reshape(2, 8).astype(np.float32)  # distinct scores, fixed
    layers = [
        [schedules.LayerSchedule(8, 0.5, 1, 10, r), schedules.LayerSchedule(8, 0.75, 2, 10, r)]
        for r in (3, 9)
    ]
    tables = np.stack([schedules.count_table(ls, 12) for ls in layers])  # (2, 12, 2)
    grid_tables = np.repeat(tables, 3, axis=0)  # (6, 12, 2): rate-major
    grid_targets = np.tile(np.array([S, R, L]), 2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def sweep(table, target):
        def epoch(alive, inputs):
            e, k_L = inputs
            sel = jax.vmap(scoring.select, in_axes=(0, 0, 0, 0, None))(
                jax.random.split(jax.random.fold_in(key, e), 2), scores, alive, k_L, target
            )
            return sel.alive, jnp.sum(sel.pruned, axis=1)

        return jax.lax.scan(epoch, np.ones((2, 8), bool), (jnp.arange(12), table))

    alive, pruned_EL = jax.vmap(sweep)(grid_tables, grid_targets)
    np.testing.assert_array_equal(pruned_EL, grid_tables)  # exactly k per event, every run
    alive = np.asarray(alive)
    order = np.argsort(scores, axis=1)
    for run in range(6):
        kept = [4, 2]
        assert alive[run].sum(1).tolist() == kept
        if grid_targets[run] != R:  # iterative S (L) on fixed scores = one-shot S (L)
            for li in range(2):
                expected = np.zeros(8, bool)
                keep = (
                    order[li][8 - kept[li] :] if grid_targets[run] == S else order[li][: kept[li]]
                )
                expected[keep] = True
                np.testing.assert_array_equal(alive[run, li], expected)


def test_prune_ranks_alive_by_score_then_dead(key):
    ranks = jax.jit(jax.vmap(scoring.prune_ranks, in_axes=(None, None, None, 0)))(
        key, SCORES, ALIVE, np.array([S, L, R])
    )
    ranks = np.asarray(ranks)
    # Alive filters 0..5 in score order (ascending for S, descending for L); the dead 3 and 6 last.
    alive_s = [3, 0, 5, -1, 4, 1, -1, 2]
    alive_l = [2, 5, 0, -1, 1, 4, -1, 3]
    for got, want in ((ranks[0], alive_s), (ranks[1], alive_l)):
        np.testing.assert_array_equal(got[ALIVE], np.array(want)[ALIVE])
        assert sorted(got[~ALIVE]) == [6, 7]
    # R: a permutation of 0..7 with the six alive filters taking ranks 0..5.
    assert sorted(ranks[2]) == list(range(8)) and sorted(ranks[2][ALIVE]) == list(range(6))


def test_activation_ema_momentum_and_period_are_used():
    acts = np.random.default_rng(4).normal(size=(7, 5, 3)).astype(np.float32)  # (steps, N, O)
    run = jax.jit(
        lambda acts: jax.lax.scan(
            lambda st, a: (scoring.activation_ema_update(st, a, momentum=0.5, every=3),) * 2,
            scoring.activation_ema_init(3),
            acts,
        )[1].score
    )
    expected, hist = np.zeros(3), []
    for t in range(7):  # updates after calls 3 and 6 only
        if (t + 1) % 3 == 0:
            expected = 0.5 * np.abs(acts[t]).sum(0) + 0.5 * expected
        hist.append(expected)
    np.testing.assert_allclose(run(acts), np.array(hist), rtol=1e-6)


def test_channel_noise_is_independent_per_leaf_and_channel_exact(key):
    layer = _layer()  # kernel (3, 3, 2, 4), scale (4,), bias (4,)
    targeted = np.array([True, False, True, False])
    noisy = jax.jit(scoring.add_channel_noise)(key, layer, targeted, 0.5)
    for name in layer:  # untouched channels bit for bit, targeted ones moved
        diff = np.asarray(noisy[name]) - layer[name]
        np.testing.assert_array_equal(diff[..., ~targeted], 0.0)
        assert np.all(diff[..., targeted] != 0)
    # One key per leaf: the two (4,) leaves must not receive the same draws.
    d_scale = np.asarray(noisy["scale"]) - layer["scale"]
    d_bias = np.asarray(noisy["bias"]) - layer["bias"]
    assert not np.allclose(d_scale[targeted], d_bias[targeted])
    chex.assert_trees_all_equal(
        jax.jit(scoring.add_channel_noise)(key, layer, targeted, 0.0), layer
    )


def test_bad_shapes_and_targets_raise(key):
    with pytest.raises(ValueError, match="kernel must have >= 2 dims"):
        scoring.filter_norm(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="kernel must have >= 2 dims"):
        scoring.unperturbed_std(np.ones(4, np.float32), np.ones(4, bool))
    with pytest.raises(ValueError, match="activation must have >= 1 dims"):
        scoring.activation_ema_update(scoring.activation_ema_init(1), np.float32(1.0))
    with pytest.raises(ValueError, match="must be \\(O,\\) vectors"):
        scoring.select(key, SCORES.reshape(2, 4), ALIVE.reshape(2, 4), 1, S)
    with pytest.raises(ValueError, match="must be \\(O,\\) vectors"):
        scoring.select(key, SCORES, ALIVE[:7], 1, S)
    with pytest.raises(ValueError, match="equal \\(E,\\) arrays"):
        scoring.generalization(np.ones(5), np.ones(4), 0)
    with pytest.raises(ValueError, match="target must be one of"):
        scoring.target_code(3)
    assert [scoring.target_code(t) for t in (0, 1, 2, "S", "largest")] == [S, R, L, S, L]
    assert scoring.target_code(np.int64(2)) == L and type(scoring.target_code(np.int64(2))) is int
    with pytest.raises(ValueError, match="target must be one of"):
        scoring.target_code(np.int64(3))
    # Ties in the best test accuracy: the first epoch wins (documented).
    g = scoring.generalization(np.array([0.8, 0.9, 0.9]), np.array([1.0, 0.95, 0.99]), 0)
    assert int(g.best_epoch) == 1 and float(g.gap) == pytest.approx(0.05)
