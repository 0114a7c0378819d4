"""Many-seed training: vmap == sequential == single runs; pruned weights stay zero; exact resume."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import data, masks, pruners, train


class _TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(8)(x))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(x)


def _dataset(n=48, d=5):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
    split = lambda a, b: data.Split(x[a:b], y[a:b])
    return data.Dataset(train=split(0, 32), test=split(32, n), num_classes=3, name="toy")


CFG = train.TrainConfig(optimizer="adam", learning_rate=1e-2, batch_size=8, epochs=3, eval_batch_size=16)
MODEL = _TinyNet()
TX = train.make_optimizer(CFG)


def _init(key, sparsity=0.5, tx=TX):
    init_key, mask_key = jax.random.split(key)
    state = train.init_state(init_key, MODEL, jnp.zeros((1, 5)), tx)
    flags = masks.prunable_tree(state.params)
    mask = pruners.random_uniform(mask_key, state.params, sparsity, flags)
    return train.state_from_params(jax.random.wrap_key_data(state.key), state.params, state.batch_stats, tx, mask)


def _fit(strategy, keys, **kw):
    cfg = train.TrainConfig(**{**CFG.__dict__, "seed_strategy": strategy})
    states = train.map_seeds(_init, (0,), strategy)(keys)
    run_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    return train.fit(MODEL, cfg, states, _dataset(), run_keys, progress=False, **kw)


@pytest.fixture(scope="module")
def vmapped():
    return _fit("vmap", train.seed_keys(0, 2))


def test_vmap_equals_sequential_equals_single_seed(vmapped):
    keys = train.seed_keys(0, 2)
    seq_states, seq_hist = _fit("sequential", keys)
    chex.assert_trees_all_close(vmapped[0], seq_states, rtol=1e-5, atol=1e-6)
    singles = [_fit("sequential", keys[i : i + 1])[0] for i in range(2)]
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs), *singles)
    chex.assert_trees_all_close(vmapped[0], stacked, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vmapped[1][-1]["test_error"], seq_hist[-1]["test_error"], atol=1e-6)
    # Seeds differ: different init, mask and data order.
    assert not np.allclose(vmapped[0].params["Dense_0"]["kernel"][0], vmapped[0].params["Dense_0"]["kernel"][1])


def test_masked_weights_exactly_zero_after_training(vmapped):
    states, hist = vmapped
    for name in ("Dense_0", "Dense_1"):
        w, m = states.params[name]["kernel"], states.mask[name]["kernel"]
        assert np.all(np.asarray(w)[np.asarray(m) == 0] == 0.0)
        assert np.any(np.asarray(w)[np.asarray(m) == 1] != 0.0)
    assert int(states.step[0]) == 3 * (32 // 8)
    assert len(hist) == 3 and hist[-1]["train_loss"][0] < hist[0]["train_loss"][0]


def test_resume_after_kill_is_identical(vmapped, tmp_path):
    class Killed(Exception):
        pass

    def kill_after_first(epoch, _):
        if epoch == 1:
            raise Killed

    keys = train.seed_keys(0, 2)
    with pytest.raises(Killed):
        _fit("vmap", keys, checkpoint_dir=str(tmp_path), after_epoch=kill_after_first)
    resumed, hist = _fit("vmap", keys, checkpoint_dir=str(tmp_path))
    chex.assert_trees_all_equal(resumed, vmapped[0])
    assert hist == vmapped[1]


def test_checkpoints_of_the_standard_handler_restore(tmp_path):
    """Checkpoints written through orbax's StandardSave (this project's format until the array
    metadata store was turned off) restore through `restore_checkpoint`, leaf dtypes included; a
    save on top of them is the next latest step."""
    import orbax.checkpoint as ocp

    old = {"w": jnp.arange(12.0).reshape(3, 4), "step": jnp.int32(7),
           "bn": {"scale": jnp.full((2,), 1.5, jnp.bfloat16)}}
    with ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(create=True)) as m:
        m.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(old),
                                          meta=ocp.args.JsonSave({"hist": [1.5]})))
        m.wait_until_finished()
    target = jax.tree.map(jnp.zeros_like, old)
    step, state, meta = train.restore_checkpoint(str(tmp_path), target)
    assert step == 5 and meta == {"hist": [1.5]}
    chex.assert_trees_all_equal(state, old)  # values and dtypes
    new = jax.tree.map(lambda v: v + 1, old)
    train.save_checkpoint(str(tmp_path), 6, new, {"hist": [2.5]})
    step, state, meta = train.restore_checkpoint(str(tmp_path), target)
    assert step == 6 and meta == {"hist": [2.5]}
    chex.assert_trees_all_equal(state, new)


def test_bad_inputs():
    with pytest.raises(ValueError, match="strategy"):
        train.resolve_strategy("threads", "mlp")
    with pytest.raises(ValueError, match="optimizer"):
        train.make_optimizer(train.TrainConfig(optimizer="lion"))
    with pytest.raises(ValueError, match="unknown train config"):
        train.TrainConfig.from_dict({"lr": 1.0})
    assert train.default_strategy("small_cnn", "cpu") == "sequential"
    assert train.default_strategy("small_cnn", "gpu") == "vmap"
    assert train.default_strategy("mlp", "cpu") == "vmap"


def test_sequential_stacks_every_output_kind_like_vmap():
    def fn(key, x, scale):  # outputs: a PRNG key, an int, floats in a nested tree
        k1, k2 = jax.random.split(key)
        return {"key": k1, "n": jnp.sum(x > 0).astype(jnp.int32),
                "y": (x * scale + jax.random.normal(k2, x.shape), x.sum())}

    keys, x = jax.random.split(jax.random.key(0), 3), jnp.arange(12.0).reshape(3, 4) - 5.0
    seq = train.map_seeds(fn, (0, 0, None), "sequential")(keys, x, 2.0)
    vm = train.map_seeds(fn, (0, 0, None), "vmap")(keys, x, 2.0)
    chex.assert_trees_all_equal(jax.random.key_data(seq.pop("key")), jax.random.key_data(vm.pop("key")))
    chex.assert_trees_all_close(seq, vm, rtol=1e-6)
    assert seq["n"].dtype == jnp.int32 and seq["n"].tolist() == [0, 2, 4]  # rows -5..-2, -1..2, 3..6
    assert not x.is_deleted() and not keys.is_deleted()  # only the internal output buffer is donated
    with pytest.raises(ValueError, match="in_axes 0"):  # nothing to map over
        train.map_seeds(lambda v: v, (None,), "sequential")(jnp.ones(2))
    with pytest.raises(ValueError, match="expected 3 arguments"):
        train.map_seeds(fn, (0, 0, None), "sequential")(keys, x)


def _ce_by_hand(logits, y):
    """Mean -log softmax(logits)[y], written without optax."""
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0])


@functools.lru_cache(maxsize=2)
def _sgd_setup(momentum):
    """(tx, state, x, y): SGD at learning rate 0.3 on a half-pruned _TinyNet, one batch of 8."""
    tx = train.make_optimizer(train.TrainConfig(optimizer="sgd", learning_rate=0.3, momentum=momentum))
    state = jax.jit(functools.partial(_init, tx=tx))(jax.random.key(3))  # one compile, not eager ops
    ds = _dataset()
    return tx, state, jnp.asarray(ds.train.x[:8]), jnp.asarray(ds.train.y[:8])


@pytest.fixture(scope="module")
def sgd_step():
    """(s0, s1, metrics, x, y): one jitted plain-SGD train_step from s0."""
    tx, s0, x, y = _sgd_setup(0.0)
    s1, metrics = jax.jit(lambda s: train.train_step(s, x, y, model=MODEL, tx=tx))(s0)
    return s0, s1, metrics, x, y


@jax.jit
def _grad_by_hand(params, batch_stats, mask, x, y):
    """(loss, grad, logits, new batch_stats) of the train-mode loss of m * w, from model.apply."""

    def loss_fn(p):
        masked = jax.tree.map(lambda w, m: w * m, p, mask)
        logits, upd = MODEL.apply({"params": masked, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])
        return _ce_by_hand(logits, y), (logits, upd["batch_stats"])

    (loss, (logits, bs)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, g, logits, bs


def test_sgd_step_equals_masked_gradient_step_by_hand(sgd_step):
    """Plain SGD: w' = m * (w - lr * dL(m * w)/dw), train-mode BatchNorm statistics updated; with
    momentum 0.9 the second step is w'' = w' - lr * (g2 + 0.9 g1) (optax's heavy ball)."""
    lr = 0.3
    s0, s1, metrics, x, y = sgd_step
    loss, g, logits, bs = _grad_by_hand(s0.params, s0.batch_stats, s0.mask, x, y)
    expected = jax.tree.map(lambda w, gi, m: m * (w - lr * gi), s0.params, g, s0.mask)
    chex.assert_trees_all_close(s1.params, expected, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s1.batch_stats, bs, rtol=1e-5, atol=1e-6)
    # The running mean moved off its init (0) by (1 - 0.9) * batch mean: train mode was used.
    assert np.abs(np.asarray(s1.batch_stats["BatchNorm_0"]["mean"])).max() > 1e-3
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["error"], np.mean(np.argmax(logits, -1) != np.asarray(y)))
    assert int(s1.step) == 1
    for name in ("Dense_0", "Dense_1"):
        w, m = np.asarray(s1.params[name]["kernel"]), np.asarray(s0.mask[name]["kernel"])
        assert 0 < m.sum() < m.size and np.all(w[m == 0] == 0.0)
        # Most kept weights moved (a dead ReLU unit leaves a few): the step is not a no-op.
        assert np.mean(w[m == 1] != np.asarray(s0.params[name]["kernel"])[m == 1]) > 0.5

    tx, s0, x, y = _sgd_setup(0.9)
    step = jax.jit(lambda s: train.train_step(s, x, y, model=MODEL, tx=tx))
    s2 = step(step(s0)[0])[0]
    _, g1, _, bs1 = _grad_by_hand(s0.params, s0.batch_stats, s0.mask, x, y)
    w1 = jax.tree.map(lambda w, gi, m: m * (w - lr * gi), s0.params, g1, s0.mask)
    _, g2, _, _ = _grad_by_hand(w1, bs1, s0.mask, x, y)
    w2 = jax.tree.map(lambda w, a, b, m: m * (w - lr * (a + 0.9 * b)), w1, g2, g1, s0.mask)
    chex.assert_trees_all_close(s2.params, w2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size", [5, 16, 1000])
def test_evaluate_equals_full_batch_eval_mode_apply(sgd_step, batch_size):
    """16 test examples in batches of 5 (4 padded rows), 16, or more than n: the eval-mode (running
    statistics) logits, loss and error of m * w on every example, each counted once."""
    state = sgd_step[1]
    # Running statistics far from any batch's own, so train-mode BatchNorm would give other logits.
    state = state.replace(batch_stats=jax.tree.map(lambda v: v + 0.7, state.batch_stats))
    ds = _dataset()
    xt, yt = jnp.asarray(ds.test.x), jnp.asarray(ds.test.y)
    assert xt.shape[0] == 16
    out, logits = jax.jit(lambda s: (
        train.evaluate(s, xt, yt, model=MODEL, batch_size=batch_size),
        train.predict(MODEL, s.params, s.batch_stats, s.mask, xt, batch_size)))(state)
    masked = jax.tree.map(lambda w, m: w * m, state.params, state.mask)
    ref = MODEL.apply({"params": masked, "batch_stats": state.batch_stats}, xt, train=False)
    assert logits.shape == (16, 3)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["loss"], _ce_by_hand(ref, yt), rtol=1e-5)
    err = np.mean(np.argmax(np.asarray(ref), -1) != np.asarray(yt))
    assert 0 < err < 1 and float(out["error"]) == pytest.approx(err, abs=1e-7)


def test_adamw_step_decays_kept_weights_and_keeps_pruned_ones_zero():
    """One adamw step (lr 0.1, wd 0.5) from weights that are nonzero under the mask too:
    w' = m * (w - lr * (g / (|g| + eps) + wd * w)) (first Adam step: m_hat = g, v_hat = g^2).
    Catches weight_decay not passed on (plain adam), coupled or wrong-signed decay, and decay
    resurrecting pruned weights when only the gradient is masked (no mask re-applied)."""
    lr, wd = 0.1, 0.5
    tx = train.make_optimizer(train.TrainConfig(optimizer="adamw", learning_rate=lr, weight_decay=wd))
    s0 = jax.jit(functools.partial(_init, tx=tx))(jax.random.key(3))
    # Nonzero weights where m == 0, so only the re-applied mask can keep them at zero under decay.
    s0 = s0.replace(params=jax.tree.map(lambda w, m: jnp.where(m == 0, 0.3, w), s0.params, s0.mask))
    ds = _dataset()
    x, y = jnp.asarray(ds.train.x[:8]), jnp.asarray(ds.train.y[:8])
    s1, _ = jax.jit(lambda s: train.train_step(s, x, y, model=MODEL, tx=tx))(s0)
    _, g, _, _ = _grad_by_hand(s0.params, s0.batch_stats, s0.mask, x, y)
    g = jax.tree.map(lambda gi, m: gi * m, g, s0.mask)
    expected = jax.tree.map(lambda w, gi, m: m * (w - lr * (gi / (jnp.abs(gi) + 1e-8) + wd * w)),
                            s0.params, g, s0.mask)
    chex.assert_trees_all_close(s1.params, expected, rtol=1e-5, atol=1e-6)
    for name in ("Dense_0", "Dense_1"):
        w, m = np.asarray(s1.params[name]["kernel"]), np.asarray(s0.mask[name]["kernel"])
        assert 0 < m.sum() < m.size and np.all(w[m == 0] == 0.0)
        # Without decay the kept weights would differ by lr * wd * w (~0.05 w): it was applied.
        w0 = np.asarray(s0.params[name]["kernel"])[m == 1]
        assert np.abs(lr * wd * w0).max() > 1e-2


def test_train_epoch_order_is_batch_indices_of_the_key_only():
    """train_epoch == train_step over x[batch_indices(key, n, b, steps)] in order; the state's own
    key does not enter, one epoch (4 batches of 8 of 32) sees every example exactly once, and another
    key gives another result. Catches shuffling with state.key, sampling with replacement, a fixed
    order, or a wrong step count."""
    tx, s0, _, _ = _sgd_setup(0.0)
    ds = _dataset()
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    k = jax.random.key(11)
    epoch = jax.jit(lambda s, key: train.train_epoch(s, x, y, key, model=MODEL, tx=tx, batch_size=8, steps=4))
    s_ep, m_ep = epoch(s0, k)
    idx = data.batch_indices(k, 32, 8, 4)
    assert idx.shape == (4, 8) and sorted(np.asarray(idx).ravel().tolist()) == list(range(32))
    step = jax.jit(lambda s, i: train.train_step(s, x[i], y[i], model=MODEL, tx=tx))
    s, losses = s0, []
    for i in idx:
        s, m = step(s, i)
        losses.append(float(m["loss"]))
    chex.assert_trees_all_close(s_ep, s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m_ep["loss"], losses, rtol=1e-5)
    assert int(s_ep.step) == 4
    other_state_key = s0.replace(key=jax.random.key_data(jax.random.key(99)))
    chex.assert_trees_all_equal(epoch(other_state_key, k)[0].params, s_ep.params)
    assert not np.allclose(epoch(s0, jax.random.key(12))[0].params["Dense_0"]["kernel"],
                           s_ep.params["Dense_0"]["kernel"])


def test_fit_history_is_epoch_means_and_evaluate_of_the_state():
    """fit for 2 epochs of steps_per_epoch=3 == two vmapped train_epochs with keys
    fold_in(run_key, epoch); each history record holds the mean train loss/error of its epoch's
    steps and `evaluate` of the state after it, per seed. Catches last-step (not mean) train metrics,
    evaluating the pre-epoch state, one key for every epoch, and ignoring steps_per_epoch."""
    keys = train.seed_keys(0, 2)
    cfg = dataclasses.replace(CFG, epochs=2, steps_per_epoch=3, seed_strategy="vmap")
    states0 = train.map_seeds(_init, (0,), "vmap")(keys)
    run_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    seen = []
    final, hist = train.fit(MODEL, cfg, states0, _dataset(), run_keys, progress=False,
                            after_epoch=lambda e, s: seen.append((e, s)))
    ds = _dataset()
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    xt, yt = jnp.asarray(ds.test.x), jnp.asarray(ds.test.y)
    epoch = jax.jit(jax.vmap(functools.partial(train.train_epoch, model=MODEL, tx=TX, batch_size=8, steps=3),
                             in_axes=(0, None, None, 0)))
    ev = jax.jit(jax.vmap(functools.partial(train.evaluate, model=MODEL, batch_size=16), in_axes=(0, None, None)))
    s = states0
    assert [r["epoch"] for r in hist] == [1, 2] and [e for e, _ in seen] == [1, 2]
    for e, rec in enumerate(hist):
        s, m = epoch(s, x, y, jax.vmap(jax.random.fold_in, in_axes=(0, None))(run_keys, e))
        chex.assert_trees_all_close(seen[e][1], s, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rec["train_loss"], m["loss"].mean(-1), rtol=1e-5)
        np.testing.assert_allclose(rec["train_error"], m["error"].mean(-1), atol=1e-6)
        out = ev(s, xt, yt)
        np.testing.assert_allclose(rec["test_loss"], out["loss"], rtol=1e-5)
        np.testing.assert_allclose(rec["test_error"], out["error"], atol=1e-6)
        assert len(rec["train_loss"]) == 2 and len(rec["test_error"]) == 2
    chex.assert_trees_all_close(final, s, rtol=1e-5, atol=1e-6)
    assert final.step.tolist() == [6, 6]


def test_fit_map_seeds_and_seed_keys_validate_their_inputs():
    """Clear ValueErrors before any training: batch larger than the training set, states and run
    keys of different seed counts, an unknown map_seeds strategy, batch_shards without "sharded",
    weight decay on an optimizer other than adamw, an unknown optimizer.
    seed_keys: reproducible, pairwise distinct, seed-dependent."""
    keys = train.seed_keys(0, 2)
    states = train.map_seeds(_init, (0,), "vmap")(keys)
    with pytest.raises(ValueError, match="batch_size 64 exceeds the 32 training examples"):
        train.fit(MODEL, dataclasses.replace(CFG, batch_size=64), states, _dataset(), keys, progress=False)
    with pytest.raises(ValueError, match="2 states but 3 run keys"):
        train.fit(MODEL, CFG, states, _dataset(), train.seed_keys(1, 3), progress=False)
    with pytest.raises(ValueError, match="strategy must be one of"):
        train.map_seeds(lambda v: v, (0,), "threads")
    for opt in ("adam", "sgd"):  # weight decay is adamw's; elsewhere it would be dropped silently
        with pytest.raises(ValueError, match=f"weight_decay=0.1 applies to optimizer 'adamw' only, "
                                             f"got optimizer='{opt}'"):
            train.make_optimizer(train.TrainConfig(optimizer=opt, weight_decay=0.1))
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        train.make_optimizer(train.TrainConfig(optimizer="lamb"))
    for strategy in ("vmap", "sequential", "sharded_sequential"):
        with pytest.raises(ValueError, match="batch_shards=2 needs seed strategy 'sharded'"):
            train.map_seeds(lambda v: v, (0,), strategy, batch_shards=2)
    k = jax.random.key_data(train.seed_keys(5, 4))
    chex.assert_trees_all_equal(k, jax.random.key_data(train.seed_keys(5, 4)))
    assert len({tuple(r) for r in np.asarray(k).tolist()}) == 4
    assert not np.array_equal(k, jax.random.key_data(train.seed_keys(6, 4)))
