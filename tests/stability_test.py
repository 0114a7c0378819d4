"""Generalization-stability experiments: exact channel masking on real models, noise windows, and
the quick presets of experiments/stability.py and experiments/noise_injection.py end to end."""

import json
import os

import chex
import jax
import pytest
import jax.numpy as jnp
import numpy as np
import optax

from experiments import gst
from jaxprune import masks, models, scoring

pytestmark = pytest.mark.usefixtures("fast_compile")


def _perturbed_bn(params, key):
    """BN scale/bias away from their init (1, 0), so a zero after BN can only come from the mask."""
    def f(path, v):
        name = masks.path_str(path)
        if name.endswith("scale") or name.endswith("bias"):
            return v + 0.5 + jax.random.uniform(jax.random.fold_in(key, hash(name) % 1000), v.shape)
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
    layer = gst._layer(state.train.params, units[0])
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
