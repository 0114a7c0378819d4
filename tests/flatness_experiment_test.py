"""flatness.hutchinson_block_traces (the shared-probe Hutchinson the experiment uses) against the
library's hutchinson_trace and exact Hessians, and experiments/flatness.py: the whole study on a
tiny real stability run (trained, pruned, checkpointed)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from experiments import flatness as fexp
from jaxprune import flatness


def _tiny_stability_config() -> config_dict.ConfigDict:
    """A smaller study than stability's quick preset (2 convs, 3 configs x 2 seeds, 2 epochs): the
    quick preset costs ~30 s, and every flatness measure compiles a second-order program of it."""
    from experiments import stability

    c = stability.get_config()
    c.num_seeds = 2
    c.data.update(name="digits", num_train=256, num_test=0, downsample=1, fallback="")
    c.model.kwargs = config_dict.create(channels=(4, 4), dense=8, batch_norm=True, pool_impl="xla")
    c.layers.update(names="conv2", fractions="0.5", starts="0", ends="1")
    c.targets, c.periods = "S,L", "1"
    c.train.update(epochs=2, batch_size=128, lr_milestones="", checkpoint_every=2,
                   learning_rate=1e-2)
    return c


@pytest.fixture(scope="module")
def stability_dir(tmp_path_factory) -> str:
    from experiments import stability

    d = str(tmp_path_factory.mktemp("stability"))
    jax.config.update("jax_disable_most_optimizations", True)  # fast_compile, module-scoped
    try:
        stability.run(_tiny_stability_config(), d)
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
    return d


def _mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"][None])
    logits = h @ params["l2"]["w"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def test_block_traces_match_hutchinson_and_exact_blocks(key):
    p_key, x_key, y_key = jax.random.split(key, 3)
    ks = jax.random.split(p_key, 3)
    params = {"l1": {"w": jax.random.normal(ks[0], (3, 4)), "b": jax.random.normal(ks[1], (4,))},
              "l2": {"w": jax.random.normal(ks[2], (4, 2))}}
    x, y = jax.random.normal(x_key, (16, 3)), jax.random.randint(y_key, (16,), 0, 2)
    mask = jax.tree.map(jnp.ones_like, params)
    mask["l1"]["w"] = mask["l1"]["w"].at[0, :2].set(0.0).at[2, 3].set(0.0)
    params = jax.tree.map(lambda p, m: p * m, params, mask)
    loss = lambda p: _mlp_loss(p, x, y)  # noqa: E731
    names, groups = flatness.layer_group_rows(params, mask)
    assert names == ["l1", "l2"]

    @jax.jit
    def both(k):
        ours = flatness.hutchinson_block_traces(k, loss, params, mask, 256, 64, jnp.asarray(groups))
        lib = flatness.hutchinson_trace(jax.random.split(k)[0], loss, params, 256, mask)
        return ours, lib

    ours, lib = both(jax.random.key(1))
    # Same probes as the library: the same estimate and standard error.
    np.testing.assert_allclose(ours["trace"], lib.estimate, rtol=1e-5)
    np.testing.assert_allclose(ours["trace_se"], lib.stderr, rtol=1e-4)
    np.testing.assert_allclose(ours["layers"].sum(), ours["trace"], rtol=1e-5)  # groups partition
    # Block estimates are unbiased for the exact kept diagonal blocks; the pruned-region one for
    # the pruned block of the (unmasked) loss.
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    h = jax.jit(jax.hessian(lambda w: loss(unravel(w))))(flat)
    m = jax.flatten_util.ravel_pytree(mask)[0]
    diag = jnp.diag(h)
    exact_layers = np.asarray(jnp.asarray(groups) @ diag)
    np.testing.assert_array_less(np.abs(ours["layers"] - exact_layers),
                                 4 * ours["layers_se"] + 1e-6)
    exact_pruned = float(jnp.sum((1 - m) * diag))
    assert abs(float(ours["pruned"]) - exact_pruned) < 4 * float(ours["pruned_se"]) + 1e-6
    assert abs(exact_pruned) > 1e-3  # a tanh net (no dead channels): the pruned block is not flat


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_missing_stability_workdir_raises(tmp_path):
    c = fexp.get_config()
    c.stability_workdir = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match="experiments.stability"):
        fexp.run(c, str(tmp_path / "out"))


def test_unknown_split_runs_raises():
    c = fexp.get_config()
    c.split_runs = "yes"
    with pytest.raises(ValueError, match="split_runs='yes'"):
        fexp._preset(c)


def test_run_indices_out_of_range_raise(stability_dir, tmp_path):
    c = fexp.get_config()
    c.quick, c.stability_workdir, c.runs = True, stability_dir, "0,6"  # 6 runs: 0..5
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\)"):
        fexp.run(c, str(tmp_path))


@pytest.fixture(scope="module")
def flatness_quick(stability_dir, tmp_path_factory):
    """experiments/flatness.py's quick preset on the tiny study: (config, workdir, output)."""
    c = fexp.get_config()
    c.quick = True
    c.stability_workdir = stability_dir
    d = tmp_path_factory.mktemp("flatness")
    jax.config.update("jax_disable_most_optimizations", True)  # fast_compile, module-scoped
    try:
        out = fexp.run(c, str(d))
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
    return c, d, out


def test_flatness_quick_on_stability_run(flatness_quick):
    c, tmp_path, out = flatness_quick
    for f in ("config.json", "measures.jsonl", "measures.csv", "correlations.jsonl",
              "correlations.md", "table.md", "timing.jsonl", "summary.jsonl",
              "scatter_stability.png", "scatter_test.png", "spectrum.png"):
        assert os.path.getsize(tmp_path / f) > 0, f
    rows = _lines(tmp_path / "measures.jsonl")
    assert len(rows) == 6 and [r["run"] for r in rows] == list(range(6))
    assert {r["config"] for r in rows} == {"none", "S_r1", "L_r1"}
    d = np.array([[r["trace_hutch"], r["trace_hutchpp"]] for r in rows])
    se = np.array([[r["trace_hutch_se"], r["trace_hutchpp_se"]] for r in rows])
    assert np.all(np.isfinite(d)) and np.all(d[:, 0] > 0)
    # Two independent unbiased estimators of the same trace: within a few standard errors.
    np.testing.assert_array_less(np.abs(d[:, 0] - d[:, 1]), 5 * np.hypot(se[:, 0], se[:, 1]))
    total = np.sqrt((se ** 2).sum(0)).max()
    assert abs(d[:, 0].sum() - d[:, 1].sum()) < 4 * np.sqrt(2) * total
    for r in rows:
        layers = sum(v for k, v in r.items()
                     if k.startswith("trace_layer_") and not k.endswith("_se"))
        np.testing.assert_allclose(layers, r["trace_hutch"], rtol=1e-4, atol=1e-4)
        cov_layers = sum(v for k, v in r.items() if k.startswith("cov_layer_"))
        np.testing.assert_allclose(cov_layers, r["cov_trace"], rtol=1e-4)
        assert 0 < r["cov_trace_centred"] <= r["cov_trace"] * (1 + 1e-6)
        np.testing.assert_allclose(r["tic_proxy"], r["cov_trace"] / r["trace_hutch"], rtol=1e-5)
        assert np.isfinite(r["tic_proxy"]) and r["tic_proxy"] > 0
        # Lanczos and power iteration both estimate lambda_max from below.
        lam = r["lambda_max_lanczos"]
        assert lam > 0 and r["lanczos_top"] == sorted(r["lanczos_top"], reverse=True)
        if r["index"] % 2 == 0:  # power iteration and TIC: on every expensive_every = 2nd run
            assert abs(r["lambda_max_power"] - lam) < 0.3 * lam
            assert r["tic_trace"] > 0 and np.isfinite(r["tic_trace"])
            assert r["lambda_min_lanczos"] + r["tic_damping"] > 0
        else:
            assert np.isnan(r["tic_trace"]) and np.isnan(r["trace_topk_power"])
        # Bisection refines the first grid crossing from below, within one grid step.
        if np.isfinite(r["eps_sharpness_grid"]):
            assert 0 < r["eps_sharpness"] <= r["eps_sharpness_grid"] + 1e-6
            assert r["eps_sharpness_grid"] - r["eps_sharpness"] < c.sharpness.step * 2 + 1e-6
        if r["period"] > 0:  # pruned channels are dead (BN scale = bias = 0, ReLU'(0) = 0): flat
            assert r["trace_pruned"] == 0.0 and r["cov_pruned"] == 0.0
            assert r["num_kept"] < rows[0]["num_kept"]
    corr = _lines(tmp_path / "correlations.jsonl")
    assert {(r["target"], r["group"]) for r in corr if r["measure"] == "trace_hutch"} == {
        (t, g) for t in ("mean_stability", "best_test", "gap") for g in ("pruned runs", "all runs")}
    for r in corr:
        assert -1 - 1e-9 <= r["pearson_r"] <= 1 + 1e-9 and -1 - 1e-9 <= r["kendall_tau"] <= 1 + 1e-9
        assert 0 <= r["pearson_p"] <= 1 and 0 <= r["kendall_p"] <= 1 and r["n"] >= 3
    assert all(cf in open(tmp_path / "table.md").read() for cf in ("none", "S_r1", "L_r1"))
    assert len(out["measures"]) == 6


def test_flatness_measures_match_exact_hessian_and_gradients(stability_dir, flatness_quick):
    """Every run's loss, accuracy, kept count and Tr(C) (uncentred and centred) against per-example
    gradients of the masked eval-mode loss on the first 64 test images, and run 4 (Prune_L) against
    its exact 814 x 814 Hessian: Hutchinson and Hutch++ within 5 standard errors of Tr(D H D),
    Lanczos and power-iteration Ritz values below the exact eigenvalues (Cauchy interlacing).
    Catches measures on the wrong examples (e.g. num_examples before the quick preset), without
    the mask, in train-mode BN or on another run's checkpoint, and a mis-normalised Tr(C)."""
    from jax.flatten_util import ravel_pytree

    from experiments import gst, stability
    from jaxprune import masks, train

    c, _, out = flatness_quick
    n = fexp._preset(c).num_examples
    with open(os.path.join(stability_dir, "config.json")) as f:
        sc = stability._preset(config_dict.ConfigDict(json.load(f)))
    states, _ = stability.load_states(sc, stability_dir)
    ds = gst.load_data(sc.data)
    model = fexp.common.make_model(sc.model, ds.num_classes)
    x, y = jnp.asarray(ds.test.x[:n]), jnp.asarray(ds.test.y[:n])
    unravel = ravel_pytree(jax.tree.map(lambda v: v[0], states.train.params))[1]

    def loss(w, bs, xb, yb):
        logits, _ = train.forward(model, unravel(w), bs, None, xb, train=False)
        return train.cross_entropy(logits, yb), jnp.mean(jnp.argmax(logits, -1) == yb)

    @jax.jit
    def exact(w, bs):
        per_example = jax.vmap(jax.grad(lambda w, xi, yi: loss(w, bs, xi[None], yi[None])[0]),
                               in_axes=(None, 0, 0))
        return loss(w, bs, x, y), per_example(w, x, y)

    for i, r in enumerate(out["measures"]):
        st = jax.tree.map(lambda v, i=i: v[i], states.train)
        w = ravel_pytree(masks.apply(st.params, st.mask))[0]
        m = np.asarray(ravel_pytree(st.mask)[0], np.float64)
        (value, acc), g = exact(w, st.batch_stats)
        g = np.asarray(g, np.float64) * m  # kept coordinates
        assert r["num_kept"] == int(m.sum()) and (m.sum() < m.size) == (r["period"] > 0)
        assert r["loss"] == pytest.approx(float(value), rel=1e-5)
        assert r["accuracy"] == pytest.approx(float(acc), abs=1e-7)
        np.testing.assert_allclose(r["cov_trace"], np.mean(np.sum(g ** 2, 1)), rtol=1e-4)
        np.testing.assert_allclose(r["cov_trace_centred"], np.mean(np.sum((g - g.mean(0)) ** 2, 1)),
                                   rtol=1e-4)
        if i != 4:
            continue
        hess = jax.jit(jax.hessian(lambda w: loss(w, st.batch_stats, x, y)[0]))
        h = np.asarray(hess(w), np.float64)
        hk = (h + h.T) / 2 * np.outer(m, m)  # D H D
        eig = np.sort(np.linalg.eigvalsh(hk))[::-1]
        for k in ("trace_hutch", "trace_hutchpp"):  # unbiased: within 5 of their standard errors
            assert abs(r[k] - np.trace(hk)) < 5 * r[k + "_se"], (k, r[k], np.trace(hk))
        top = np.asarray(r["lanczos_top"])
        np.testing.assert_array_less(top, eig[: top.size] + 1e-3 * eig[0])
        # Largest Ritz value / Rayleigh quotient: never above lambda_max, and (6 Lanczos steps,
        # 5 power steps; measured 0.05 % and 0.6 % below) close to it.
        assert 0.9 * eig[0] < r["lambda_max_lanczos"] and 0.8 * eig[0] < r["lambda_max_power"]
        assert r["lambda_max_power"] <= eig[0] * (1 + 1e-3)


def test_correlations_match_scipy_and_skip_what_they_should():
    """fexp.correlations on hand-made rows against scipy: pairs with a NaN measure are dropped,
    groups with < 3 finite points or a constant side are skipped, the 'pruned runs' group holds
    only period > 0, and bookkeeping fields (kept_*, *_se, lists, strings, the targets
    themselves) are never correlated. Catches NaN rows kept, the two groups mixed up, a minimum
    of 2 points, and run metadata (run, seed, best_epoch, ...) treated as a measure."""
    from scipy import stats as sps

    rng = np.random.default_rng(0)
    rows = []
    for i in range(7):
        rows.append(dict(run=i, index=i, seed=i % 2, config="none" if i < 2 else "L_r1",
                         period=0 if i < 2 else 1, rate=0.0, mean_stability=rng.normal(90, 3),
                         best_test=rng.uniform(0.5, 0.9), gap=rng.normal(0.1, 0.05),
                         best_epoch=i % 3, train_at_best=rng.uniform(), final_test=rng.uniform(),
                         num_events=i % 2,
                         tic_damping=5.0, trace_hutch=rng.normal(5, 1),
                         trace_hutch_se=0.1, kept_conv2=2, lanczos_top=[1.0, 0.5],
                         eps=float("nan") if i in (2, 3, 4) else rng.normal(0.2, 0.05),
                         flat=1.0, loss=rng.normal(2.0, 0.2)))
    got = {(r["measure"], r["target"], r["group"]): r for r in fexp.correlations(rows)}
    targets = ("mean_stability", "best_test", "gap")
    # eps: 4 finite values overall, 2 among pruned runs (skipped); flat is constant (skipped).
    assert set(got) == {(m, t, g) for m in ("trace_hutch", "loss") for t in targets
                        for g in ("pruned runs", "all runs")} | {("eps", t, "all runs")
                                                                 for t in targets}
    for (measure, target, group), r in got.items():
        rs = [q for q in rows if group == "all runs" or q["period"] > 0]
        xy = np.array([(q[measure], q[target]) for q in rs])
        xy = xy[np.isfinite(xy).all(1)]
        p, k = sps.pearsonr(xy[:, 0], xy[:, 1]), sps.kendalltau(xy[:, 0], xy[:, 1])
        assert r["n"] == len(xy) == {"eps": 4}.get(measure, 5 if group == "pruned runs" else 7)
        got_stats = [r["pearson_r"], r["pearson_p"], r["kendall_tau"], r["kendall_p"]]
        np.testing.assert_allclose(got_stats, [p.statistic, p.pvalue, k.statistic, k.pvalue],
                                   rtol=1e-12)
