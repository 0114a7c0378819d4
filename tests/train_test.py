"""Many-seed training: vmap == sequential == single runs; pruned weights stay zero; exact resume."""

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


def _init(key, sparsity=0.5):
    init_key, mask_key = jax.random.split(key)
    state = train.init_state(init_key, MODEL, jnp.zeros((1, 5)), TX)
    flags = masks.prunable_tree(state.params)
    mask = pruners.random_uniform(mask_key, state.params, sparsity, flags)
    return train.state_from_params(jax.random.wrap_key_data(state.key), state.params, state.batch_stats, TX, mask)


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
