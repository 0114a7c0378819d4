"""Generalization-stability experiments: exact channel masking on real models, noise windows, and
the quick presets of experiments/stability.py and experiments/noise_injection.py end to end."""

import functools
import json
import os
import zlib

import chex
import jax
import pytest
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats as sps

from experiments import gst
from jaxprune import data as data_lib
from jaxprune import masks, models, scoring, train

pytestmark = pytest.mark.usefixtures("fast_compile")


def _perturbed_bn(params, key):
    """BN scale/bias away from their init (1, 0), so a zero after BN can only come from the mask."""
    def f(path, v):
        name = masks.path_str(path)
        if name.endswith("scale") or name.endswith("bias"):
            # crc32, not hash(): str hashes are salted per process (PYTHONHASHSEED is set in
            # conftest too late to reach this process), which made these values change run to run.
            return v + 0.5 + jax.random.uniform(jax.random.fold_in(key, zlib.crc32(name.encode())),
                                                v.shape)
        return v
    return jax.tree_util.tree_map_with_path(f, params)


def _intermediates(model, params, batch_stats, x, train):
    variables = {"params": params, "batch_stats": batch_stats}
    mutable = ["intermediates"] + (["batch_stats"] if train else [])
    _, out = model.apply(variables, x, train=train, capture_intermediates=True, mutable=mutable)
    return out["intermediates"]


def test_prune_event_zeroes_channels_after_bn_and_relu(key):
    model = models.get_model("small_cnn", 10, channels=(4, 4, 6, 6), dense=8, batch_norm=True)
    x = jax.random.normal(key, (5, 8, 8, 1))
    tx = optax.adam(1e-3)
    units = gst.pruned_units(models.conv_units(model, model.init(key, x[:1])["params"]),
                             ["conv2", "conv4"])
    state = gst.init_run(key, model=model, sample_x=x[:1], tx=tx, units=units)
    state = state.replace(train=state.train.replace(params=_perturbed_bn(state.train.params, key)))
    prune = jax.jit(lambda s, k: gst.prune_event(s, k, jnp.array([2, 3]), gst.make_spec(scoring.LARGEST),
                                                 units=units, scoring_name="l2"))
    new, npruned = prune(state, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(npruned), [2, 3])
    # Prune_L removed the filters of largest L2 norm.
    for u, k in zip(units, (2, 3)):
        norms = np.asarray(scoring.l2_score(masks.get_path(state.train.params, u.kernel_path)))
        dead = ~np.asarray(new.alive[u.name])
        np.testing.assert_array_equal(np.flatnonzero(dead), np.sort(np.argsort(-norms)[:k]))
    p = masks.apply(new.train.params, new.train.mask)
    for train_mode in (False, True):
        inter = _intermediates(model, p, new.train.batch_stats, x, train_mode)
        for u, bn in zip(units, ("bn2", "bn4")):
            y = inter[bn]["__call__"][0]
            dead = ~np.asarray(new.alive[u.name])
            assert np.all(np.asarray(y)[..., dead] == 0.0)  # exactly zero after BN, so after ReLU
            assert np.all(np.asarray(jax.nn.relu(y))[..., dead] == 0.0)
            assert np.abs(np.asarray(y)[..., ~dead]).min() > 0.0  # live channels are not silenced
    # BN running statistics are untouched by the event.
    chex.assert_trees_all_equal(new.train.batch_stats, state.train.batch_stats)


def test_resnet20_projection_shortcut_masked(key):
    model = models.get_model("resnet20", 10, shortcut="B", width=0.5)
    x = jax.random.normal(key, (2, 8, 8, 3))
    variables = model.init(key, x)
    params = _perturbed_bn(variables["params"], key)
    units = models.conv_units(model, params)
    u = {v.name: v for v in units}["stage2_block1_conv2"]
    assert u.shortcut_paths  # the stride-2 block has a projection shortcut
    c = jnp.ones((masks.get_path(params, u.kernel_path).shape[-1],)).at[jnp.array([0, 3, 5])].set(0.0)
    mask = masks.channel_to_param_mask(params, {u.name: c}, units)
    inter = _intermediates(model, masks.apply(params, mask), variables["batch_stats"], x, False)
    out = np.asarray(inter["stage2_block1"]["__call__"][0])  # relu(bn2(conv2) + shortcut)
    dead = np.asarray(c) == 0
    assert np.all(out[..., dead] == 0.0)
    assert np.abs(out[..., ~dead]).max() > 0.0


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet20_identity_shortcuts_masked_with_gate(key, shortcut):
    """mask_shortcut=True: a pruned conv2 channel of an identity-shortcut block (stage1_block2) and of
    a downsampling block (A: zero-pad, B: projection) is exactly 0 after the add and ReLU."""
    model = models.get_model("resnet20", 10, shortcut=shortcut, width=0.5, mask_shortcut=True)
    x = jax.random.normal(key, (2, 8, 8, 3))
    variables = model.init(key, x)
    params = _perturbed_bn(variables["params"], key)
    units = {v.name: v for v in models.conv_units(model, params)}
    chans = {"stage1_block2_conv2": jnp.ones((8,)).at[jnp.array([1, 6])].set(0.0),
             "stage2_block1_conv2": jnp.ones((16,)).at[jnp.array([0, 3, 5, 15])].set(0.0)}
    mask = masks.channel_to_param_mask(params, chans, list(units.values()))
    inter = _intermediates(model, masks.apply(params, mask), variables["batch_stats"], x, False)
    for name, c in chans.items():
        out = np.asarray(inter[name[: -len("_conv2")]]["__call__"][0])
        dead = np.asarray(c) == 0
        assert np.all(out[..., dead] == 0.0), name
        assert np.abs(out[..., ~dead]).max() > 0.0
    # Without the gate the identity shortcut leaks through the pruned channels.
    plain = models.get_model("resnet20", 10, shortcut=shortcut, width=0.5)
    pparams = {k: ({n: w for n, w in v.items() if n != "shortcut_gate"} if isinstance(v, dict) else v)
               for k, v in params.items()}
    pu = models.conv_units(plain, pparams)
    pmask = masks.channel_to_param_mask(pparams, chans, pu)
    inter = _intermediates(plain, masks.apply(pparams, pmask), variables["batch_stats"], x, False)
    out = np.asarray(inter["stage1_block2"]["__call__"][0])
    assert np.abs(out[..., np.asarray(chans["stage1_block2_conv2"]) == 0]).max() > 0.0


def test_zeroing_window_restores_bit_for_bit(key):
    model = models.get_model("small_cnn", 10, channels=(2, 4), dense=4, batch_norm=True)
    x = jnp.ones((1, 4, 4, 1))
    units = tuple(models.conv_units(model, model.init(key, x)["params"])[1:])
    state = gst.init_run(key, model=model, sample_x=x, tx=optax.sgd(0.1), units=units)
    tgt = jnp.array([False, True, False, True])
    layer = gst._saved(state.train, units[0])
    state = state.replace(targeted={"conv2": tgt}, saved={"conv2": layer},
                          remaining={"conv2": jnp.int32(2)})
    def window_step(s, k, restore):
        spec = gst.make_spec(noise=gst.NOISE_ZERO, restore=restore)
        s = gst._perturb(s, k, spec, units)
        # a "training update" inside the window, which a restore must discard
        s = s.replace(train=s.train.replace(params=jax.tree.map(lambda v: v + 1.0, s.train.params)))
        return gst._close_windows(s, spec, units)

    step = jax.jit(window_step)
    for restore in (True, False):
        s = state
        for i in range(2):
            s = step(s, jax.random.key(i), restore)
        after = gst._layer(s.train.params, units[0])
        assert int(s.remaining["conv2"]) == 0
        for name in ("kernel", "scale", "bias"):
            got, old = np.asarray(after[name])[..., np.asarray(tgt)], np.asarray(layer[name])[..., np.asarray(tgt)]
            if restore:
                np.testing.assert_array_equal(got, old)  # bit for bit
            elif name == "kernel":
                np.testing.assert_array_equal(got, 0.0)  # returned at zero
            else:  # return-at-zero leaves BN alone: it kept both "updates"
                np.testing.assert_array_equal(got, old + 2.0)


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_stability_quick(tmp_path):
    from experiments import stability

    c = stability.get_config()
    c.quick = True
    out = stability.run(c, str(tmp_path))
    for f in ("config.json", "runs.jsonl", "runs.csv", "history.jsonl", "summary.jsonl", "table.md",
              "curves.png", "scatter.png", "rate_sweep.png"):
        assert os.path.getsize(tmp_path / f) > 0, f
    runs = _lines(tmp_path / "runs.jsonl")
    assert len(runs) == 5 * 2  # (none + S, L x 2 periods) x 2 seeds
    for r in runs:
        if r["config"] == "none":
            assert r["mean_stability"] == 100.0 and (r["kept_conv3"], r["kept_conv4"]) == (8, 8)
        else:  # final_kept = ceil((1 - f) N): 50% and 75% of 8 filters
            assert (r["kept_conv3"], r["kept_conv4"]) == (4, 2)
            assert np.isfinite(r["mean_stability"]) and r["num_events"] >= 2
        assert 0.0 < r["best_test"] <= 1.0 and r["best_epoch"] >= 1
    assert {r["kind"] for r in _lines(tmp_path / "summary.jsonl")} >= {"config"}
    states, recs = stability.load_states(c, str(tmp_path))
    alive = np.asarray(states.alive["conv4"])
    np.testing.assert_array_equal(alive.sum(-1), [r["kept_conv4"] for r in recs])
    assert len(out["runs"]) == 10
    _check_records_against_history(runs, _lines(tmp_path / "history.jsonl"))


# Filters pruned per epoch (conv3 + conv4) of the quick preset, by hand from the notes' formula
# kept_i = ceil(final + (N - final)(n - i)/n): period 1: conv3 (N 8, 50 %, epochs 0-2) 1, 1, 2;
# conv4 (75 %, epochs 1-2) 3, 3. Period 3: conv3 4 at epoch 0, conv4 6 at epoch 1.
QUICK_PRUNED = {"none": [0, 0, 0, 0], "r1": [1, 4, 5, 0], "r3": [4, 6, 0, 0]}
QUICK_RATE = {"none": 0.0, "r1": 37.5, "r3": 75.0}  # largest f / n: conv4 0.75 / 2 and 0.75 / 1


def _check_records_against_history(runs, history):
    """Each runs.jsonl record recomputed with numpy from history.jsonl (the notes' §2 definitions).

    Catches a wrong event mask (mean over all epochs, or over the wrong ones), best test taken
    before the last event or on t_pre, best_epoch off by one, gap with the wrong sign, rates and
    event epochs that differ from the schedule, and unpaired seeds across configurations.
    """
    t_pre, t_post, train_acc, pruned = (np.array([h[k] for h in history]).T
                                        for k in ("t_pre", "t_post", "train_acc", "pruned"))
    for i, r in enumerate(runs):
        period = r["config"].split("_")[-1]
        np.testing.assert_array_equal(pruned[i], QUICK_PRUNED[period])
        assert r["rate"] == pytest.approx(QUICK_RATE[period])
        ev = pruned[i] > 0
        assert r["num_events"] == ev.sum()
        np.testing.assert_array_equal(t_post[i][~ev], t_pre[i][~ev])  # no event: nothing changes
        inst = (t_pre[i][ev] - t_post[i][ev]) / t_pre[i][ev]
        want = 100.0 * (1 - inst.mean()) if ev.any() else 100.0
        assert r["mean_stability"] == pytest.approx(want, rel=1e-5, abs=1e-4)
        last = np.flatnonzero(ev).max() if ev.any() else 0
        best = last + int(np.argmax(t_post[i][last:]))  # first maximum at or after the last event
        assert r["best_epoch"] == best + 1
        assert r["best_test"] == pytest.approx(t_post[i][best], abs=1e-7)
        assert r["train_at_best"] == pytest.approx(train_acc[i][best], abs=1e-7)
        assert r["gap"] == pytest.approx(train_acc[i][best] - t_post[i][best], abs=1e-6)
        assert r["final_test"] == pytest.approx(t_post[i][-1], abs=1e-7)
        assert r["seed"] == i % 2 and r["run"] == r["index"] == i
    # Paired seeds: every configuration starts from the same init and data order, so the first
    # epoch's training (before any event) is identical across the 5 configurations of a seed.
    for s in (0, 1):
        for a in (train_acc, t_pre):
            np.testing.assert_array_equal(a[s::2, 0], np.full(5, a[s, 0]))
    assert len({tuple(t_post[i]) for i in range(2, 10, 2)}) == 4  # pruned configs differ after that


def test_noise_injection_quick(tmp_path):
    from experiments import noise_injection

    c = noise_injection.get_config()
    c.quick = True
    out = noise_injection.run(c, str(tmp_path))
    for f in ("config.json", "runs.jsonl", "summary.jsonl", "table.md", "curves.png", "final_acc.png"):
        assert os.path.getsize(tmp_path / f) > 0, f
    summary = {s["condition"]: s for s in out["summary"]}
    assert set(summary) == {"none", "prune", "zero:3", "restore:3", "gauss:3"}
    for s in summary.values():
        assert s["n"] == 2 and 0.0 < s["final_test_mean"] <= 1.0
    # Runs i = condition i // 2, seed i % 2; events (period 2) at epochs 0, 1, 2 of 4.
    runs, history = _lines(tmp_path / "runs.jsonl"), _lines(tmp_path / "history.jsonl")
    conds = ["none", "prune", "zero:3", "restore:3", "gauss:3"]
    t_pre, t_post, train_acc = (np.array([h[k] for h in history]).T
                                for k in ("t_pre", "t_post", "train_acc"))
    for i, r in enumerate(runs):
        assert (r["condition"], r["seed"]) == (conds[i // 2], i % 2)
        assert r["final_test"] == pytest.approx(t_post[i, -1], abs=1e-7)
        assert r["best_test"] == pytest.approx(t_post[i, 2:].max(), abs=1e-7)  # >= last event
        if r["condition"] != "prune":  # windows count training batches: t_post sees no noise
            np.testing.assert_array_equal(t_post[i], t_pre[i])
    for s in (0, 1):
        # Paired seeds: identical up to the first event (after epoch 0's training).
        np.testing.assert_array_equal(train_acc[s::2, 0], np.full(5, train_acc[s, 0]))
        np.testing.assert_array_equal(t_pre[s::2, 0], np.full(5, t_pre[s, 0]))
        # Every perturbation reached training (noise=True was passed): its later epochs differ
        # from 'none', and return-at-zero differs from restore.
        for i in (4 + s, 6 + s, 8 + s):
            assert (train_acc[i, 1:] != train_acc[s, 1:]).any(), conds[i // 2]
        assert (train_acc[4 + s, 1:] != train_acc[6 + s, 1:]).any()
    # Summary rows: the means of their own runs and Welch t-tests against the right reference.
    for n, row in summary.items():
        mine = [r["final_test"] for r in runs if r["condition"] == n]
        assert row["final_test_mean"] == pytest.approx(np.mean(mine), abs=1e-12)
        for ref in ("none", "prune"):
            other = [r["final_test"] for r in runs if r["condition"] == ref]
            if ref != n and np.ptp(mine + other) > 0:
                want = sps.ttest_ind(mine, other, equal_var=False)
                assert row[f"final_test_t_vs_{ref}"] == pytest.approx(want.statistic, rel=1e-9)
                assert row[f"final_test_p_vs_{ref}"] == pytest.approx(want.pvalue, rel=1e-9)


@pytest.mark.parametrize("name, fields, events", [
    ("none", (scoring.LARGEST, False, gst.NOISE_NONE, False, False, 0), False),
    ("prune", (scoring.LARGEST, True, gst.NOISE_NONE, False, False, 0), True),
    ("zero:16", (scoring.LARGEST, False, gst.NOISE_ZERO, False, False, 16), True),
    ("restore:4", (scoring.LARGEST, False, gst.NOISE_ZERO, True, True, 4), True),
    ("gauss:1", (scoring.LARGEST, False, gst.NOISE_GAUSSIAN, False, False, 1), True),
])
def test_parse_condition(name, fields, events):
    """The module docstring's conditions: Prune_L targets; zero = iter (new targets, return at
    zero), restore = cumulative and restored, gauss = iter. Catches swapped restore / cumulative
    flags or a window length off by one."""
    from experiments import noise_injection

    spec, has_events = noise_injection.parse_condition(name)
    assert has_events == events
    got = (int(spec.target), bool(spec.permanent), int(spec.noise), bool(spec.restore),
           bool(spec.cumulative), int(spec.window))
    assert got == fields


@pytest.mark.parametrize("name",
                         ["zero:0", "zero:", "zero:-2", "gauss:x", "noise:3", "prune:3", ""])
def test_parse_condition_rejects_bad_names(name):
    from experiments import noise_injection

    with pytest.raises(ValueError, match="expected none, prune"):
        noise_injection.parse_condition(name)


def test_fallback_dataset_is_not_downsampled(tmp_path):
    """Missing Fashion-MNIST files: the fallback (digits, 8x8) keeps its resolution; the 2x
    downsample meant for 28x28 made it 4x4, too small for the CPU default CNN."""
    from ml_collections import config_dict

    c = config_dict.create(name="fashion_mnist", data_dir=str(tmp_path), num_train=64, num_test=32,
                           num_samples=0, downsample=2, fallback="digits")
    ds = gst.load_data(c)
    assert ds.name == "digits" and ds.train.x.shape[1:3] == (8, 8)
    c.fallback = ""
    with pytest.raises(Exception, match="not found"):
        gst.load_data(c)


# ----------------------------------------------------------------------------- hand-built layers
# Two pruned "conv" units without a model: prune_event, _perturb and _close_windows only read the
# kernels and BN scale/bias at the units' paths, so each test below compiles a few small programs.


def _unit(name):
    return models.ConvUnit(name, (name, "kernel"), ("bn_" + name,))


HAND_UNITS = (_unit("a"), _unit("b"))


def _hand_state(kernel_b, alive_b, seed=0):
    """Unit a: 3 filters; unit b: kernel_b's filters; BN scale/bias away from (1, 0), distinct."""
    rng = np.random.default_rng(seed)
    o = kernel_b.shape[-1]
    params = {
        "a": {"kernel": jnp.asarray(rng.normal(size=(1, 1, 2, 3)), jnp.float32),
              "bias": jnp.ones(3)},
        "bn_a": {"scale": jnp.asarray(rng.uniform(0.5, 2, 3), jnp.float32),
                 "bias": jnp.asarray(rng.uniform(0.1, 1, 3), jnp.float32)},
        "b": {"kernel": jnp.asarray(kernel_b, jnp.float32), "bias": jnp.full((o,), 0.5)},
        "bn_b": {"scale": jnp.asarray(rng.uniform(-2, 2, o), jnp.float32),
                 "bias": jnp.asarray(rng.uniform(-1, 1, o), jnp.float32)},
        "head": {"kernel": jnp.ones((o, 2))},
    }
    stats = {"bn_a": {"mean": jnp.zeros(3), "var": jnp.ones(3)},
             "bn_b": {"mean": jnp.ones(o), "var": jnp.full((o,), 2.0)}}
    ts = train.TrainState(params=params, batch_stats=stats, opt_state=(),
                          mask=masks.ones_like(params), step=jnp.int32(5),
                          key=jax.random.key_data(jax.random.key(0)))
    alive = {"a": jnp.ones(3, bool), "b": jnp.asarray(alive_b)}
    saved = {u.name: jax.tree.map(jnp.zeros_like, gst._saved(ts, u)) for u in HAND_UNITS}
    return gst.RunState(ts, alive, {n: jnp.zeros_like(a) for n, a in alive.items()}, saved,
                        {n: jnp.zeros((), jnp.int32) for n in alive})


_hand_prune = {s: jax.jit(functools.partial(gst.prune_event, units=HAND_UNITS, scoring_name=s))
               for s in ("l2", "l1", "ebn")}
# 6 filters of unit b; filters 1 (smallest) and 4 (largest) were selected by an earlier event.
# Alive filters 0, 2, 3, 5 have L2 norms 4.24, 5, 2.12, 3.03 and L1 norms 18, 5, 9, 4.7: the two
# scorings pick different filters.
KB = np.zeros((3, 3, 2, 6))
KB[..., 0], KB[..., 1], KB[..., 3], KB[..., 4], KB[..., 5] = 1.0, 0.01, 0.5, 100.0, 0.1
KB[0, 0, 0, 2], KB[0, 0, 0, 5] = 5.0, 3.0
ALIVE_B = np.array([True, False, True, True, False, True])


def _ebn_ref(gamma, beta):
    g = np.abs(gamma)
    return beta * sps.norm.cdf(beta / g) + g * sps.norm.pdf(beta / g)


@pytest.mark.parametrize("scoring_name", ["l2", "l1", "ebn"])
@pytest.mark.parametrize("target", [scoring.SMALLEST, scoring.LARGEST])
def test_prune_event_prunes_the_k_extreme_alive_filters(scoring_name, target):
    """Prune_S / Prune_L with k = 2 on unit b (2 of its 6 filters already dead) and k = 5 > 3 alive
    on unit a. Catches: selecting among dead filters, a flipped S/L, ignoring `scoring_name`, k not
    clipped to the alive count, the stored weights of pruned filters not zeroed, and an event that
    touches live filters, BN statistics, the optimiser state or the step."""
    state = _hand_state(KB, ALIVE_B)
    p = jax.tree.map(np.asarray, state.train.params)
    score = {"l2": np.sqrt((KB ** 2).sum((0, 1, 2))), "l1": np.abs(KB).sum((0, 1, 2)),
             "ebn": _ebn_ref(p["bn_b"]["scale"], p["bn_b"]["bias"])}[scoring_name]
    alive_idx = np.flatnonzero(ALIVE_B)
    order = alive_idx[np.argsort(score[alive_idx] * (1 if target == scoring.SMALLEST else -1))]
    if scoring_name == "l2":  # the three scorings pick three different pairs (the test has power)
        picks = {name: frozenset(alive_idx[np.argsort(v[alive_idx])[:2]]) for name, v in
                 (("l2", score), ("l1", np.abs(KB).sum((0, 1, 2))),
                  ("ebn", _ebn_ref(p["bn_b"]["scale"], p["bn_b"]["bias"])))}
        assert len(set(picks.values())) == 3, picks
    new, npruned = _hand_prune[scoring_name](state, jax.random.key(3), jnp.array([5, 2]),
                                             gst.make_spec(target))
    np.testing.assert_array_equal(npruned, [3, 2])  # unit a: k = 5 clipped to its 3 alive filters
    want_alive = ALIVE_B.copy()
    want_alive[order[:2]] = False
    np.testing.assert_array_equal(new.alive["b"], want_alive)
    np.testing.assert_array_equal(new.alive["a"], [False] * 3)
    q = jax.tree.map(np.asarray, new.train.params)
    for unit, alive in (("b", want_alive), ("a", np.zeros(3, bool))):
        for leaf, v in gst._layer(q, _unit(unit)).items():
            old = np.asarray(gst._layer(p, _unit(unit))[leaf])
            np.testing.assert_array_equal(v[..., ~alive], 0.0)  # every dead filter zeroed, masked
            np.testing.assert_array_equal(v[..., alive], old[..., alive])  # live filters untouched
            m = np.asarray(gst._layer(new.train.mask, _unit(unit))[leaf])
            np.testing.assert_array_equal(m, np.broadcast_to(alive, m.shape).astype(m.dtype))
    np.testing.assert_array_equal(q["head"]["kernel"], p["head"]["kernel"])
    chex.assert_trees_all_equal(new.train.batch_stats, state.train.batch_stats)
    assert int(new.train.step) == 5
    # A permanent event opens no noise window.
    assert int(new.remaining["b"]) == 0 and not np.asarray(new.targeted["b"]).any()


def test_prune_event_random_target_is_uniform_over_alive_filters():
    """Prune_R: exactly k = 2 of the 4 alive filters, each with probability 1/2 over keys, every one
    of the 6 pairs occurring, dead filters never. Catches R ignoring `alive`, ignoring the key, or
    falling back to a score order."""
    state = _hand_state(KB, ALIVE_B)
    spec = gst.make_spec(scoring.RANDOM)
    run = jax.jit(jax.vmap(lambda k: gst.prune_event(
        state, k, jnp.array([0, 2]), spec, units=HAND_UNITS, scoring_name="l2")[0].alive["b"]))
    alive = np.asarray(run(jax.random.split(jax.random.key(0), 800)))
    pruned = ALIVE_B[None, :] & ~alive
    assert (pruned.sum(1) == 2).all() and not (~ALIVE_B[None, :] & alive).any()
    freq = pruned.mean(0)[ALIVE_B]
    np.testing.assert_array_less(np.abs(freq - 0.5), 5 * np.sqrt(0.25 / 800))
    assert len({tuple(np.flatnonzero(r)) for r in pruned}) == 6


def test_prune_event_of_a_noise_run_only_opens_a_window():
    """Noise runs (Prune_L targets, not permanent): params and mask unchanged, `alive` updated as
    bookkeeping, and a window on the NEW targets (iter) or on every target so far (cumulative) with
    the layer saved at the event. A layer with k = 0 keeps its open window; noise 'none' opens none.
    Catches a noise event that masks or zeroes weights, a cumulative/iter mix-up, a stale `saved`,
    and a k = 0 event that resets another window."""
    state = _hand_state(KB, ALIVE_B)
    state = state.replace(targeted={**state.targeted, "a": jnp.array([True, False, False])},
                          remaining={**state.remaining, "a": jnp.int32(7)})
    L = scoring.LARGEST
    cases = {
        "iter": (gst.make_spec(L, False, gst.NOISE_ZERO, window=3), [1, 0, 1, 0, 0, 0], 3),
        "cumulative": (gst.make_spec(L, False, gst.NOISE_ZERO, restore=True, cumulative=True,
                                     window=5), [1, 1, 1, 0, 1, 0], 5),
        "gauss": (gst.make_spec(L, False, gst.NOISE_GAUSSIAN, window=4), [1, 0, 1, 0, 0, 0], 4),
        "none": (gst.make_spec(L, False), [0] * 6, 0),
    }
    for name, (spec, tgt, window) in cases.items():
        new, npruned = _hand_prune["l2"](state, jax.random.key(3), jnp.array([0, 2]), spec)
        np.testing.assert_array_equal(npruned, [0, 2])
        np.testing.assert_array_equal(new.alive["b"], [False, False, False, True, False, True])
        chex.assert_trees_all_equal(new.train.params, state.train.params)  # nothing zeroed
        chex.assert_trees_all_equal(new.train.mask, state.train.mask)
        np.testing.assert_array_equal(new.targeted["b"], np.array(tgt, bool), err_msg=name)
        assert int(new.remaining["b"]) == window, name
        want_saved = gst._saved(state.train, HAND_UNITS[1]) if window else state.saved["b"]
        chex.assert_trees_all_equal(new.saved["b"], want_saved)
        # Unit a (k = 0) keeps its window as it was.
        np.testing.assert_array_equal(new.targeted["a"], [True, False, False])
        assert int(new.remaining["a"]) == 7
        chex.assert_trees_all_equal(new.saved["a"], state.saved["a"])


_hand_perturb = jax.jit(functools.partial(gst._perturb, units=HAND_UNITS))


def test_perturb_hits_only_targeted_channels_of_open_windows():
    """Unit b: filter 0 dead (targeted earlier, weights x 50), filters 1, 2 targeted (x 10),
    filter 3 the only unperturbed one. Gaussian noise goes on the targeted kernels only, with the
    std of filter 3's weights (numpy); return-at-zero zeroes the targeted kernels only; restore
    also zeroes their BN scale and bias. Unit a (window closed) and noise 'none' change nothing.
    Catches a std taken over dead or targeted filters, noise on BN or other channels, and a closed
    window that still perturbs."""
    rng = np.random.default_rng(2)
    kb = rng.normal(size=(3, 3, 32, 4)) * np.array([50.0, 10.0, 10.0, 0.3])
    state = _hand_state(kb, np.array([False, True, True, True]))
    tgt = np.array([False, True, True, False])
    state = state.replace(targeted={"a": jnp.ones(3, bool), "b": jnp.asarray(tgt)},
                          remaining={"a": jnp.int32(0), "b": jnp.int32(2)})
    before = jax.tree.map(np.asarray, state.train.params)
    std = np.std(kb[..., 3])
    L = scoring.LARGEST
    for name, spec in {"gauss": gst.make_spec(L, False, gst.NOISE_GAUSSIAN, window=2),
                       "zero": gst.make_spec(L, False, gst.NOISE_ZERO, window=2),
                       "restore": gst.make_spec(L, False, gst.NOISE_ZERO, restore=True,
                                                cumulative=True, window=2),
                       "none": gst.make_spec(L, False)}.items():
        after = jax.tree.map(np.asarray, _hand_perturb(state, jax.random.key(4), spec).train.params)
        for k in ("a", "bn_a", "head"):
            chex.assert_trees_all_equal(after[k], before[k])  # unit a's window is closed
        np.testing.assert_array_equal(after["b"]["bias"], before["b"]["bias"])
        k_new, k_old = after["b"]["kernel"], before["b"]["kernel"]
        np.testing.assert_array_equal(k_new[..., ~tgt], k_old[..., ~tgt])
        if name == "gauss":
            noise = (k_new - k_old)[..., tgt]  # 576 draws
            assert abs(np.std(noise) / std - 1) < 5 / np.sqrt(2 * noise.size), (np.std(noise), std)
            assert abs(np.mean(noise)) < 5 * std / np.sqrt(noise.size)
        elif name in ("zero", "restore"):
            np.testing.assert_array_equal(k_new[..., tgt], 0.0)
        else:
            np.testing.assert_array_equal(k_new, k_old)
        for leaf in ("scale", "bias"):
            v, old = after["bn_b"][leaf], before["bn_b"][leaf]
            np.testing.assert_array_equal(v[~tgt], old[~tgt])
            np.testing.assert_array_equal(v[tgt], 0.0 if name == "restore" else old[tgt])


# ----------------------------------------------------------------------------- run_step windows


@functools.lru_cache(maxsize=1)
def _window_setup():
    """A 2-4 channel CNN, 16 images, its run state and the jitted run_step / train_step /
    prune_event (built once, shared by the window tests)."""
    key = jax.random.key(0)
    # pool_impl="xla": under fast_compile the reshape pool's gradient is NaN on the zeroed channels
    # (its tie count; see experiments/flatness.py `pool_impl`).
    model = models.get_model("small_cnn", 4, channels=(2, 4), dense=4, batch_norm=True,
                             pool_impl="xla")
    x = jax.random.normal(key, (16, 4, 4, 1))
    y = jnp.arange(16) % 4
    tx = optax.adam(0.05)
    units = gst.pruned_units(models.conv_units(model, model.init(key, x[:1])["params"]), ["conv2"])
    s0 = gst.init_run(key, model=model, sample_x=x[:1], tx=tx, units=units)
    # BN bias > 0: a zeroed kernel still gets a gradient (ReLU'(0) = 0 would freeze it).
    s0 = s0.replace(train=s0.train.replace(params=_perturbed_bn(s0.train.params, key)))
    step = jax.jit(functools.partial(gst.run_step, model=model, tx=tx, units=units, noise=True))
    plain = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
    prune = jax.jit(functools.partial(gst.prune_event, units=units, scoring_name="l2"))
    return x, y, units, s0, step, plain, prune


def test_run_step_window_lasts_exactly_window_batches():
    """A window of 2 opened by a noise event: batches 1-2 are perturbed, batch 3 on is exactly a
    plain train_step. Return-at-zero: the kernel trains from zero on batch 1 and is 0 after batch 2
    (closing), BN never zeroed. Restore: kernel and BN are 0 (a dead channel gets no update) after
    batch 1 and bit-for-bit the event's values after batch 2. Catches an off-by-one window, a
    perturbation before the closing batch that is skipped, and noise after the window."""
    x, y, units, s0, step, plain, prune = _window_setup()
    L = scoring.LARGEST
    specs = {"zero": gst.make_spec(L, False, gst.NOISE_ZERO, window=2),
             "restore": gst.make_spec(L, False, gst.NOISE_ZERO, restore=True, cumulative=True,
                                      window=2),
             "gauss": gst.make_spec(L, False, gst.NOISE_GAUSSIAN, window=2)}
    for name, spec in specs.items():
        s, _ = prune(s0, jax.random.key(1), jnp.array([2]), spec)
        tgt = np.asarray(s.targeted["conv2"])
        assert tgt.sum() == 2 and int(s.remaining["conv2"]) == 2
        event = jax.tree.map(np.asarray, gst._layer(s.train.params, units[0]))
        layers = []
        for t in range(4):
            ts_plain, m_plain = plain(s.train, x[2 * t:2 * t + 8], y[2 * t:2 * t + 8])
            s, m = step(s, x, y, jnp.arange(8) + 2 * t, jax.random.key(10 + t), spec)
            layers.append(jax.tree.map(np.asarray, gst._layer(s.train.params, units[0])))
            if t < 2:  # inside the window the targeted channels differ from plain training
                diff = np.abs(layers[-1]["kernel"] - np.asarray(
                    gst._layer(ts_plain.params, units[0])["kernel"]))[..., tgt]
                assert diff.max() > 1e-4, (name, t)
            else:  # window closed: a plain step
                chex.assert_trees_all_close(s.train, ts_plain, rtol=1e-6, atol=1e-7)
                chex.assert_trees_all_close(m, m_plain, rtol=1e-6)
        assert int(s.remaining["conv2"]) == 0
        k1, k2 = layers[0]["kernel"][..., tgt], layers[1]["kernel"][..., tgt]
        if name == "zero":
            assert np.abs(k1).min() > 0 and np.abs(k1).max() < 0.2  # one Adam step away from 0
            np.testing.assert_array_equal(k2, 0.0)
            for leaf in ("scale", "bias"):  # BN left alone (and trained)
                assert np.all(layers[1][leaf][tgt] != 0.0)
        elif name == "restore":
            for leaf in ("kernel", "scale", "bias"):
                np.testing.assert_array_equal(layers[0][leaf][..., tgt], 0.0)
                np.testing.assert_array_equal(layers[1][leaf][..., tgt], event[leaf][..., tgt])


# ----------------------------------------------------------------------------- train_runs


def _tiny_runs_kwargs():
    """2 permanent runs (Prune_R, Prune_S) of a 2-4 channel CNN on 32 learnable 4x4 images, 3 epochs
    of 4 batches; conv2 pruned 2 + 1 (R) and 1 + 2 (S) filters; 20 test images in batches of 8."""
    rng = np.random.default_rng(0)

    def split(n):
        x = rng.normal(size=(n, 4, 4, 1)).astype(np.float32)
        y = (x[:, :2].mean((1, 2, 3)) > x[:, 2:].mean((1, 2, 3))).astype(np.int32)
        return data_lib.Split(x, y)

    ds = data_lib.Dataset(split(32), split(20), 2, "tiny")
    model = models.get_model("small_cnn", 2, channels=(2, 4), dense=4, batch_norm=True,
                             pool_impl="xla")
    tx = optax.adam(0.03)
    sample_x = jnp.asarray(ds.train.x[:1])
    params0 = model.init(jax.random.key(0), sample_x)["params"]
    units = gst.pruned_units(models.conv_units(model, params0), ["conv2"])
    keys = jax.random.split(jax.random.key(7), 6)
    states = gst.stack([gst.init_run(k, model=model, sample_x=sample_x, tx=tx, units=units)
                        for k in keys[:2]])
    specs = gst.stack([gst.make_spec(scoring.RANDOM), gst.make_spec(scoring.SMALLEST)])
    counts = np.array([[[0], [2], [1]], [[1], [0], [2]]], np.int32)  # (R, E, L)
    return dict(model=model, tx=tx, units=units, scoring_name="l2", states=states, specs=specs,
                counts=counts, ds=ds, data_keys=keys[2:4], prune_keys=keys[4:6], batch_size=8,
                eval_batch_size=8, strategy="sequential", noise=False, ckpt_dir=None,
                checkpoint_every=0, desc="tiny")


@pytest.fixture(scope="module")
def tiny_runs():
    jax.config.update("jax_disable_most_optimizations", True)  # fast_compile, module-scoped
    try:
        kw = _tiny_runs_kwargs()
        states, hist = gst.train_runs(**kw)
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
    return kw, states, hist


def test_train_runs_history_matches_a_direct_recomputation(tiny_runs):
    """train_acc, train_loss, t_pre, t_post, pruned counts and final states of train_runs against a
    plain loop written from the protocol: epoch e trains on batch_indices(fold_in(data_key, e)),
    t_pre is the eval-mode accuracy of the masked net, then prune_event(fold_in(prune_key, e)),
    then t_post. Catches t_pre / t_post measured on the wrong side of the event, events at the
    wrong epoch, a dropped or repeated batch, a wrong epoch key, test accuracy over a truncated
    last test batch (20 = 8 + 8 + 4) and a train accuracy averaged over the wrong axis."""
    kw, states, hist = tiny_runs
    model, tx, units, ds = kw["model"], kw["tx"], kw["units"], kw["ds"]
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
    prune = jax.jit(functools.partial(gst.prune_event, units=units, scoring_name="l2"))

    @jax.jit
    def accuracy(st):
        logits, _ = train.forward(model, st.train.params, st.train.batch_stats, st.train.mask,
                                  jnp.asarray(ds.test.x), train=False)
        return jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(ds.test.y))

    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    R, E, _ = kw["counts"].shape
    want = {k: np.zeros((R, E)) for k in ("train_acc", "train_loss", "t_pre", "t_post")}
    want["pruned"] = np.zeros_like(kw["counts"])
    finals = []
    for r in range(R):
        st = jax.tree.map(lambda v: v[r], kw["states"])
        spec = jax.tree.map(lambda v: v[r], kw["specs"])
        for e in range(E):
            idx = data_lib.batch_indices(jax.random.fold_in(kw["data_keys"][r], e), num_examples=32,
                                         batch_size=8, num_batches=4)
            errs, losses = [], []
            for t in range(4):
                ts, m = step(st.train, x[idx[t]], y[idx[t]])
                st = st.replace(train=ts)
                errs.append(float(m["error"]))
                losses.append(float(m["loss"]))
            want["train_acc"][r, e], want["train_loss"][r, e] = 1 - np.mean(errs), np.mean(losses)
            want["t_pre"][r, e] = float(accuracy(st))
            if kw["counts"][r, e].any():
                st, n = prune(st, jax.random.fold_in(kw["prune_keys"][r], e),
                              jnp.asarray(kw["counts"][r, e]), spec)
                want["pruned"][r, e] = np.asarray(n)
            want["t_post"][r, e] = float(accuracy(st))
        finals.append(st)
    for k in ("train_acc", "t_pre", "t_post"):
        np.testing.assert_allclose(hist[k], want[k], rtol=0, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(hist["train_loss"], want["train_loss"], rtol=1e-5)
    np.testing.assert_array_equal(hist["pruned"], kw["counts"])
    np.testing.assert_array_equal(want["pruned"], kw["counts"])
    chex.assert_trees_all_close(states, gst.stack(finals), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(states.alive["conv2"]).sum(-1), [1, 1])
    # The history has power: some event moved the test accuracy, and it is not at chance level.
    assert (hist["t_post"] != hist["t_pre"]).any() and hist["t_pre"].max() >= 0.7
    no_event = kw["counts"].sum(-1) == 0
    np.testing.assert_array_equal(hist["t_post"][no_event], hist["t_pre"][no_event])


class _Interrupted(Exception):
    pass


@pytest.mark.usefixtures("fast_compile")
def test_train_runs_resumed_after_interruption_equals_an_uninterrupted_run(tiny_runs, tmp_path,
                                                                             monkeypatch):
    """Crash right after the epoch-2 checkpoint, rerun with the same arguments: the run resumes at
    epoch 2 and its final states and whole history equal the uninterrupted run's bit for bit.
    Catches a resume that retrains from epoch 0 on restored states (step count), loses the
    restored history of epochs 0-1, or restarts the data / pruning key streams."""
    kw, ref_states, ref_hist = tiny_runs
    save = train.save_checkpoint
    saved = []

    def save_then_crash(directory, step, state, meta):
        save(directory, step, state, meta)
        saved.append(step)
        raise _Interrupted

    kw = {**kw, "ckpt_dir": str(tmp_path / "ckpt"), "checkpoint_every": 2}
    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(_Interrupted):
        gst.train_runs(**kw)
    assert saved == [2]
    monkeypatch.setattr(train, "save_checkpoint", lambda *a: saved.append(a[1]) or save(*a))
    states, hist = gst.train_runs(**kw)
    assert saved == [2, 3]  # resumed: only the final epoch ran (and saved)
    chex.assert_trees_all_equal(states, ref_states)
    for k, v in ref_hist.items():
        np.testing.assert_array_equal(hist[k], v, err_msg=k)
    assert int(states.train.step[0]) == 3 * 4


def test_restore_window_also_restores_bn_running_statistics():
    """notes §3: `cumu_N_zeroing_restore` saves the targeted channels' conv weights, BN gamma, beta
    AND BN running mean and variance, and restores all of them after the window. During the window
    the zeroed channels are constant, so their running variance decays towards 0; not restoring it
    leaves eval-mode BN (t_pre / t_post) normalising restored weights with the window's stats."""
    x, y, units, s0, step, plain, prune = _window_setup()
    spec = gst.make_spec(scoring.LARGEST, False, gst.NOISE_ZERO, restore=True, cumulative=True,
                         window=2)
    s, _ = prune(s0, jax.random.key(1), jnp.array([2]), spec)
    tgt = np.asarray(s.targeted["conv2"])
    event = jax.tree.map(np.asarray, s.train.batch_stats["bn2"])
    for t in range(2):
        s, _ = step(s, x, y, jnp.arange(8) + 2 * t, jax.random.key(10 + t), spec)
    after = jax.tree.map(np.asarray, s.train.batch_stats["bn2"])
    for k in ("mean", "var"):
        np.testing.assert_array_equal(after[k][tgt], event[k][tgt])
        # ...and only those: the other channels' statistics kept training (catches a frozen layer).
        assert not np.any(after[k][~tgt] == event[k][~tgt]), k


def test_restore_runs_reads_checkpoints_written_before_bn_statistics_were_saved(key, tmp_path):
    """A checkpoint whose `saved` has no BN statistics (written before stop 23; a finished study
    that experiments/flatness.py loads) restores with a warning, the statistics taken from its own
    running statistics; a current one restores silently; no checkpoint gives None. Catches
    load_states failing on every older stability workdir."""
    import warnings

    model = models.get_model("small_cnn", 10, channels=(2, 4), dense=4, batch_norm=True)
    x = jnp.ones((1, 4, 4, 1))
    units = tuple(models.conv_units(model, model.init(key, x)["params"])[1:])
    init = functools.partial(gst.init_run, model=model, sample_x=x, tx=optax.sgd(0.1), units=units)
    state = jax.vmap(init)(jax.random.split(key, 2))
    state = state.replace(train=state.train.replace(  # running statistics away from their init
        batch_stats=jax.tree.map(lambda v: v + 0.5, state.train.batch_stats)))
    old = state.replace(saved={n: {k: v for k, v in layer.items() if k not in ("mean", "var")}
                               for n, layer in state.saved.items()})
    train.save_checkpoint(str(tmp_path / "old"), 3, old, {"hist": {}})
    with pytest.warns(UserWarning, match="before stop 23"):
        step, got, meta = gst.restore_runs(str(tmp_path / "old"), state, units)
    assert step == 3 and meta == {"hist": {}}
    chex.assert_trees_all_equal(got.train, state.train)
    for u in units:
        stats = masks.get_path(state.train.batch_stats, u.bn_path)
        chex.assert_trees_all_equal(got.saved[u.name], {**old.saved[u.name], **stats})
    train.save_checkpoint(str(tmp_path / "new"), 1, state, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chex.assert_trees_all_equal(gst.restore_runs(str(tmp_path / "new"), state, units)[1], state)
    assert train.checkpoint_tree(str(tmp_path / "none")) is None
    assert gst.restore_runs(str(tmp_path / "none"), state, units) is None
