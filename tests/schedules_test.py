"""Schedules against the counts table of the shared notes (generalization-stability.md §1.2)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import schedules

L = schedules.LayerSchedule

# (schedule, epochs, counts, final kept): the notes' oracle table (the authors' formula).
TABLE = [
    ("vgg_conv5_30_r40", L(512, 0.3, 3, 150, 40), (3, 43, 83, 123), (38, 38, 38, 39), 359),
    (
        "vgg_conv8_90_r40",
        L(512, 0.9, 6, 275, 40),
        tuple(range(6, 247, 40)),
        (65, 66, 66, 65, 66, 66, 66),
        52,
    ),
    ("vgg_conv8_90_r300", L(512, 0.9, 6, 275, 300), (6,), (460,), 52),
    (
        "rn18_l41c2_95_r40",
        L(512, 0.95, 10, 275, 40),
        tuple(range(10, 251, 40)),
        (69, 69, 70, 69, 70, 69, 70),
        26,
    ),
    ("rn18_l40c2_40_r40", L(512, 0.4, 8, 150, 40), (8, 48, 88, 128), (51, 51, 51, 51), 308),
    ("rn20_16ch_10_r30", L(16, 0.1, 40, 100, 30), (40, 70, 100), (0, 0, 1), 15),
]


@pytest.mark.parametrize("name,layer,epochs,counts,kept", TABLE, ids=[t[0] for t in TABLE])
def test_counts_match_notes_table(name, layer, epochs, counts, kept):
    del name
    assert layer.epochs == epochs
    assert layer.counts == counts
    assert layer.final_kept == kept
    assert sum(counts) == layer.num_filters - kept


def test_conv8_every_4_epochs_prunes_6_or_7_each():
    layer = L(512, 0.9, 6, 275, 4)
    assert layer.epochs[0] == 6 and layer.epochs[-1] == 274 and layer.num_events == 68
    assert set(layer.counts) == {6, 7} and sum(layer.counts) == 460


def test_final_kept_keeps_reference_float_arithmetic():
    # (1 - 0.7) * 10 = 3.0000000000000004 in floats, so the authors' ceil keeps 4 filters.
    assert schedules.final_kept(10, 0.7) == 4
    assert schedules.final_kept(16, 0.1) == 15 and schedules.final_kept(512, 0.25) == 384


@pytest.mark.parametrize(
    "period,rate",
    [(4, 1.32), (20, 6.43), (40, 12.86), (60, 18.0), (100, 30.0), (200, 45.0), (300, 90.0)],
)
def test_iterative_rates_of_figure_3(period, rate):
    assert round(100 * L(512, 0.9, 6, 275, period).iterative_rate, 2) == rate


def test_vgg_r40_table_and_events():
    layers = schedules.paper_layers("vgg11", 40)
    table = schedules.count_table(layers, 325)
    assert table.shape == (325, 4) and table.dtype == np.int32
    np.testing.assert_array_equal(
        np.flatnonzero(schedules.pruning_epochs(table)),
        [3, 4, 5, 6, 43, 44, 45, 46, 83, 84, 85, 86, 123, 124, 125, 126, 166, 206, 246],
    )
    assert schedules.last_pruning_epoch(table) == 246
    np.testing.assert_array_equal(table[:, 3][table[:, 3] > 0], [65, 66, 66, 65, 66, 66, 66])
    evs = schedules.events(layers)
    assert [(e.epoch, e.layer) for e in evs[:5]] == [(3, 0), (4, 1), (5, 2), (6, 3), (43, 0)]
    assert evs[3] == schedules.PruneEvent(6, 3, "conv8", 1, 65, 447)
    assert evs[-1] == schedules.PruneEvent(246, 3, "conv8", 7, 66, 52)


def test_zero_count_events_are_not_pruning_epochs():
    table = schedules.count_table([L(16, 0.1, 40, 100, 30)], 165)
    assert [e.k for e in schedules.events([L(16, 0.1, 40, 100, 30)])] == [0, 0, 1]
    np.testing.assert_array_equal(np.flatnonzero(schedules.pruning_epochs(table)), [100])
    assert schedules.last_pruning_epoch(np.zeros((5, 2), np.int32)) == -1


def test_counts_at_epoch_matches_table_and_sweeps_periods_in_one_program():
    periods = [4, 20, 40, 300]
    tables = np.stack(
        [schedules.count_table(schedules.paper_layers("vgg11", r), 280) for r in periods]
    )
    arrays = [schedules.layer_arrays(schedules.paper_layers("vgg11", r)) for r in periods]
    stacked = {k: np.stack([a[k] for a in arrays]) for k in arrays[0]}

    @jax.jit
    @chex.assert_max_traces(n=1)
    def all_counts(arr):  # (R, L) arrays -> (R, E, L), vmapped over rates and epochs
        per_epoch = jax.vmap(lambda e, a: schedules.counts_at_epoch(e, **a), in_axes=(0, None))
        return jax.vmap(per_epoch, in_axes=(None, 0))(jnp.arange(280), arr)

    np.testing.assert_array_equal(all_counts(stacked), tables)
    # A table indexed by a traced epoch inside jit (what the training loop does).
    pick = jax.jit(lambda t, e: t[e])
    np.testing.assert_array_equal(pick(jnp.asarray(tables[2]), 6), [0, 0, 0, 65])


def test_bad_schedules_raise():
    with pytest.raises(ValueError, match="fraction"):
        L(8, 1.5, 0, 3, 1, "conv1")
    with pytest.raises(ValueError, match="period"):
        L(8, 0.5, 0, 3, 0)
    with pytest.raises(ValueError, match="end"):
        L(8, 0.5, 5, 3, 1)
    with pytest.raises(ValueError, match="num_epochs"):
        schedules.count_table([L(8, 0.5, 0, 10, 5, "conv1")], 10)
    with pytest.raises(ValueError, match="model"):
        schedules.paper_layers("vgg16", 40)


def test_polynomial_sparsity_formula():
    f = jax.jit(lambda t, sf, t0, t1, si: schedules.polynomial_sparsity(t, sf, t0, t1, si))
    s = np.asarray([f(t, 0.9, 100, 200, 0.1) for t in (0, 100, 150, 175, 200, 1000)])
    expected = [0.1, 0.1, 0.9 - 0.8 * 0.5**3, 0.9 - 0.8 * 0.25**3, 0.9, 0.9]
    np.testing.assert_allclose(s, expected, rtol=1e-6)


def test_polynomial_sparsity_holds_between_updates():
    f = jax.jit(lambda t: schedules.polynomial_sparsity(t, 0.8, 10, 50, update_freq=10))
    held = np.asarray(jax.vmap(f)(jnp.arange(0, 60)))
    # Constant on [10 + 10 j, 10 + 10 (j + 1)); equals the continuous value on update steps.
    for j in range(4):
        np.testing.assert_array_equal(held[10 + 10 * j : 20 + 10 * j], held[10 + 10 * j])
        np.testing.assert_allclose(held[10 + 10 * j], 0.8 - 0.8 * (1 - j / 4) ** 3, rtol=1e-6)
    assert held[55] == pytest.approx(0.8)
    up = jax.jit(lambda t: schedules.is_update_step(t, 10, 50, 10))
    np.testing.assert_array_equal(
        np.flatnonzero(jax.vmap(up)(jnp.arange(60))), [10, 20, 30, 40, 50]
    )
    with pytest.raises(ValueError, match="end_step"):
        schedules.polynomial_sparsity(0, 0.5, 10, 10)


def _grid_layers():
    """Hand-picked edge cases plus 200 random small schedules (all events before epoch 61)."""
    layers = [
        L(1, 1.0, 0, 0, 1),  # one filter, one event, all pruned
        L(10, 0.7, 0, 9, 3),  # float quirk: final_kept = 4
        L(7, 0.0, 2, 20, 5),  # nothing to prune: all counts 0
        L(5, 1.0, 1, 13, 4),  # end on the grid
        L(13, 0.5, 0, 12, 1),  # period 1: 13 events of 0 or 1
        L(9, 0.33, 4, 5, 7),  # period beyond the span: one event
        L(16, 0.1, 3, 23, 7),  # end off the grid, ceil gives zero-count events
    ]
    rng = np.random.default_rng(0)
    for _ in range(200):
        start = int(rng.integers(0, 20))
        layers.append(
            L(
                int(rng.integers(1, 600)),
                float(rng.choice([0.0, 1.0, round(float(rng.uniform()), 2)], p=[0.1, 0.1, 0.8])),
                start,
                int(rng.integers(start, 61)),
                int(rng.integers(1, 25)),
            )
        )
    return layers


def test_counts_at_epoch_equals_host_table_on_a_grid():
    # The docstring claims the integer ceil equals the host's float formula "for all sizes"; the
    # vgg test covers only N = 512 and 4 periods. An off-by-one in n, floor for ceil, or an event
    # at epoch `end` dropped shows up here.
    layers = _grid_layers()
    table = schedules.count_table(layers, 61)
    arrays = schedules.layer_arrays(layers)
    traced = jax.jit(jax.vmap(lambda e: schedules.counts_at_epoch(e, **arrays)))(jnp.arange(61))
    np.testing.assert_array_equal(traced, table)
    for layer in layers:  # host-side invariants of the counts themselves
        counts, n, final = layer.counts, layer.num_events, layer.final_kept
        assert len(counts) == n and min(counts) >= 0 and sum(counts) == layer.num_filters - final
        assert schedules.kept_after(layer.num_filters, final, n, n) == final
        assert schedules.event_counts(layer.num_filters, layer.fraction, n) == counts
    assert L(10, 0.7, 0, 9, 3).counts == (1, 2, 1, 2)  # kept 10 -> 9 -> 7 -> 6 -> 4
    assert L(16, 0.1, 3, 23, 7).counts == (0, 0, 1) and L(7, 0.0, 2, 20, 5).counts == (0,) * 4


def test_more_bad_schedules_raise():
    with pytest.raises(ValueError, match="num_filters must be >= 1, got 0"):
        L(0, 0.5, 0, 3, 1)
    with pytest.raises(ValueError, match="LayerSchedule 'c': start must be >= 0, got -1"):
        L(8, 0.5, -1, 3, 1, "c")
    with pytest.raises(ValueError, match="fraction must lie in \\[0, 1\\], got -0.1"):
        L(8, -0.1, 0, 3, 1)
    with pytest.raises(ValueError, match="num_events must be >= 1"):
        schedules.event_counts(8, 0.5, 0)
    with pytest.raises(ValueError, match="at least one LayerSchedule"):
        schedules.count_table([], 10)
    with pytest.raises(ValueError, match="end_step \\(5\\) must exceed begin_step \\(10\\)"):
        schedules.polynomial_sparsity(0, 0.5, 10, 5)


def test_polynomial_sparsity_power_and_initial_value():
    f = jax.jit(lambda t: schedules.polynomial_sparsity(t, 0.9, 0, 100, 0.5, power=1.0))
    np.testing.assert_allclose(jax.vmap(f)(jnp.array([0, 25, 50, 100])), [0.5, 0.6, 0.7, 0.9])


def test_polynomial_sparsity_reaches_final_after_end_step_off_grid():
    # t1 = 45 off the grid 10, 20, ...: the held value used to stay at s(40) = 0.7977 up to step 50,
    # and no update step applied s_f. Now s(t >= 45) = s_f, and 45 is an update step.
    f = jax.jit(lambda t: schedules.polynomial_sparsity(t, 0.8, 10, 45, update_freq=10))
    after = np.asarray(jax.vmap(f)(jnp.arange(45, 56)))
    np.testing.assert_allclose(after, 0.8, rtol=1e-6)
    held = np.asarray(jax.vmap(f)(jnp.arange(40, 45)))
    np.testing.assert_allclose(held, 0.8 - 0.8 * (1 - 30 / 35) ** 3, rtol=1e-6)  # s(40), held
    up = jax.jit(lambda t: schedules.is_update_step(t, 10, 45, 10))
    np.testing.assert_array_equal(
        np.flatnonzero(jax.vmap(up)(jnp.arange(60))), [10, 20, 30, 40, 45]
    )
