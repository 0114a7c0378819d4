"""PAC-Bayes self-bounded learning with stochastic masks and data-dependent priors (issue 5 §3).

  python -m experiments.pac_bayes --workdir=workdirs/pac_bayes          # digits MLP, CPU, < 10 min
  python -m experiments.pac_bayes --config.variants=mask --config.objectives=kl --config.alphas=0.5
  python -m experiments.pac_bayes --config.preset=fashion_mnist --workdir=workdirs/pb_fmnist  # GPU
  python -m experiments.pac_bayes --config.preset=fashion_mnist_cpu --workdir=workdirs/pb_fmnist_cpu

For each prior fraction α (host loop) and S seeds at once:
  1. split the training set (split_seed) into S_α and the bound set S_{1-α} (hashes recorded);
  2. prior, from S_α only: train an MLP, prune it (magnitude), run PFT on the mask; smooth p_P to
     [ε, 1-ε]; prior weight scale σ_P from a grid;
  3. for each variant (mask / gauss / both): minimise every objective in `objectives` from Q = P,
     one compiled program vmapped over (ε, σ_P) grid x objectives, mapped over seeds with
     `seed_strategy` (as every seed-axis stage here: "sharded" splits the seeds over devices/hosts);
  4. per seed and objective keep the grid point with the lowest final objective (union bound over
     all |alphas| x |grid| values looked at), and certify it: M Monte Carlo 0-1 samples on the bound
     set (default: a fresh network h ~ Q per example, mc_repeats passes, M = mc_repeats n; or
     Dziugaite & Roy's M networks on all of it), pac_bayes.certificate (kl bound, δ + δ'). Also: stochastic test error (mean over
     sampled networks) and thresholded test error (mask 1[p > 1/2], weights μ).
Writes config.json, results.jsonl/csv (per seed), table.md, certificates.png (certificate and test
errors per variant and objective), alpha.png (certificate against α), and prior checkpoints.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_dict, config_flags

from experiments import common
from jaxprune import pft, train
from jaxprune import self_bounded as sb


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.preset = ""  # "" (digits, CPU), "fashion_mnist" (real data, LeNet-300-100; GPU) or
    # "fashion_mnist_cpu" (real data, MLP 784-100-10, per-example MC with 2 repeats: M = 60 000;
    # 2 CPU cores)
    c.seed = 0
    c.num_seeds = 2  # leading axis S of every result array
    c.split_seed = 0  # the prior/bound split (one split for all seeds; its hash is recorded)
    c.data = config_dict.create(name="digits", data_dir="", num_train=0, num_test=0, num_samples=0)
    c.model = config_dict.create(name="mlp", kwargs=config_dict.create(widths=(64,)))
    c.train = config_dict.create(  # prior weights on S_α; fields of jaxprune.train.TrainConfig
        optimizer="adam", learning_rate=2e-3, momentum=0.9, weight_decay=0.0, batch_size=128,
        epochs=60, steps_per_epoch=0, eval_batch_size=2000, seed_strategy="auto", checkpoint_every=10,
        batch_shards=1)  # "sharded" only: each seed's batch split over this many devices
    c.alphas = "0.3,0.5,0.7"  # prior fractions (each one counts in the union bound)
    c.prior = config_dict.create(
        pruner="magnitude",  # baseline mask PFT starts from (on the S_α-trained weights)
        sparsity=0.5,  # baseline sparsity
        eps="0.001",  # smoothing grid: p_P clipped to [eps, 1 - eps]
        scales="0.01,0.03",  # prior weight std grid σ_P (gauss / both variants)
    )
    c.pft = config_dict.create(  # PFT of the prior mask on S_α; fields of jaxprune.pft.PFTConfig
        num_samples=2, s0=3.0, learning_rate=0.05, steps=200, batch_size=128, joint=False,
        weight_lr=1e-4, budget_weight=0.0)
    c.variants = "mask,gauss,both"  # posterior families (jaxprune.self_bounded.VARIANTS)
    c.objectives = "classic,kl,quad,lambda,catoni"  # names in jaxprune.pac_bayes.BOUNDS
    c.sb = config_dict.create(  # posterior training; fields of jaxprune.self_bounded.SBConfig
        estimator="concrete", num_samples=2, steps=600, batch_size=128, mask_lr=0.05,
        weight_lr=1e-3, p_min=1e-4)
    c.tau = 0.5  # Concrete temperature
    c.delta = 0.025  # PAC-Bayes budget (split over the grid by the union bound)
    c.delta_prime = 0.01  # Monte Carlo budget
    # Monte Carlo term of the certificate. "per_example" (default): a fresh network h ~ Q for every
    # bound-set example, mc_repeats times: M = mc_repeats * n independent 0-1 losses for the cost of
    # mc_repeats networks on S. "networks": Dziugaite & Roy's M = mc_samples networks on all of S.
    c.mc_scheme = "per_example"
    c.mc_repeats = 10
    c.mc_samples = 1000
    c.test_samples = 32  # networks for the stochastic test error
    c.networks_per_batch = 0  # vmap this many sampled networks (GPU); 0 loops (CPU)
    c.mc_chunk = 250  # networks per compiled call of the MC certificate (progress bar); 0 = all
    c.quick = False  # tests: digits, tiny MLP, one alpha, few steps
    return c


def _apply_preset(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    c = config_dict.ConfigDict(c.to_dict())
    if c.quick:
        c.num_seeds = 2
        c.data = config_dict.create(name="digits", data_dir="", num_train=0, num_test=0, num_samples=0)
        c.model.kwargs.widths = (8,)
        c.train.update(epochs=1, batch_size=64)
        c.alphas = "0.5"
        c.prior.scales = "0.03"
        c.pft.update(steps=2, batch_size=64)
        c.variants = "both"
        c.objectives = "kl"
        c.sb.update(steps=2, batch_size=32)
        c.mc_samples = 8
        c.mc_repeats = 2
        c.test_samples = 2
    elif c.preset == "fashion_mnist":  # real data (apt dataset-fashion-mnist), LeNet-300-100
        c.data = config_dict.create(name="fashion_mnist", data_dir="", num_train=0, num_test=0,
                                    num_samples=0)
        c.model = config_dict.create(name="lenet300_100", kwargs=config_dict.create())
        c.train.update(epochs=20, batch_size=256)
        c.alphas = "0.5"
        c.pft.update(steps=1000, batch_size=256)
        c.sb.update(steps=3000, batch_size=256)
        c.mc_samples = 10000
        c.test_samples = 100
        c.networks_per_batch = 50
    elif c.preset == "fashion_mnist_cpu":  # the same real data, scaled to finish on 2 CPU cores
        c.data = config_dict.create(name="fashion_mnist", data_dir="", num_train=0, num_test=0,
                                    num_samples=0)
        c.model = config_dict.create(name="mlp", kwargs=config_dict.create(widths=(100,)))
        c.train.update(epochs=10, batch_size=256)
        c.alphas = "0.5"
        c.variants = "mask,both"
        c.objectives = "kl,catoni"
        c.pft.update(steps=500, batch_size=256)
        c.sb.update(steps=1000, batch_size=256)
        c.mc_repeats = 2
        c.test_samples = 20
    elif c.preset:
        raise ValueError(f"unknown preset {c.preset!r}; known: '', 'fashion_mnist', "
                         "'fashion_mnist_cpu'")
    return c


def _sb_config(c: config_dict.ConfigDict, variant: str, grid_size: int) -> sb.SBConfig:
    opts = (("tau", float(c.tau)),) if c.sb.estimator.startswith("concrete") else ()
    return sb.SBConfig(variant=variant, estimator_options=opts, delta=float(c.delta),
                       grid_size=grid_size, **c.sb.to_dict())


@functools.lru_cache(maxsize=8)
def _compiled_fit(model, cfg: sb.SBConfig, prunable_items: tuple, treedef: Any, strategy: str,
                  batch_shards: int):
    """map_seeds(vmap grid (vmap objectives (fit))) over the seed axis with `strategy` ("sharded":
    each device or host optimises only its seeds' bounds, each seed's minibatches split over
    `batch_shards` devices); cached across alphas."""
    prunable = jax.tree.unflatten(treedef, list(prunable_items))

    def fit_bound(key, params, logits, eps, log_std, x, y, n, obj):
        prior = sb.make_prior(params, logits, prunable, eps, log_std)
        return sb.fit(key, prior, x, y, n, obj, model=model, cfg=cfg, prunable=prunable)

    over_obj = jax.vmap(fit_bound, in_axes=(None, None, None, None, None, None, None, None, 0))
    over_grid = jax.vmap(over_obj, in_axes=(None, None, None, 0, 0, None, None, None, None))
    return train.map_seeds(over_grid, (0, 0, 0, None, None, None, None, None, None), strategy,
                           batch_shards)


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the study; returns {"results": per-(alpha, variant, objective) rows}."""
    c = _apply_preset(config)
    common.setup_workdir(c, workdir)
    t_start = time.perf_counter()
    ds = common.load_data(c.data)
    model = common.make_model(c.model, ds.num_classes)
    cfg = train.TrainConfig.from_dict(c.train)
    strategy = train.resolve_strategy(cfg.seed_strategy, c.model.name)
    keys = common.seed_streams(c.seed, c.num_seeds, ("init", "data", "mask", "pft", "post", "mc", "test"))
    alphas = common.parse_list(c.alphas, float)
    variants, objectives = common.parse_list(c.variants), common.parse_list(c.objectives)
    obj_idx = jnp.asarray([sb.OBJECTIVES.index(o) for o in objectives], jnp.int32)
    eps_list, scale_list = common.parse_list(c.prior.eps, float), common.parse_list(c.prior.scales, float)
    n_train = len(ds.train.y)
    xt, yt = jnp.asarray(ds.test.x), jnp.asarray(ds.test.y)
    npb = int(c.networks_per_batch) or None
    rows: list[dict[str, Any]] = []
    for alpha in alphas:
        split = sb.split_prior_bound(n_train, alpha, c.split_seed)
        pds = sb.prior_dataset(ds, split)  # the prior never sees a bound-set point
        ckpt = os.path.join(workdir, "ckpt", f"alpha_{alpha}")
        states, hist = common.train_dense(model, c.model.name, cfg, pds, keys["init"], keys["data"],
                                          os.path.join(ckpt, "dense"), desc=f"prior weights α={alpha}")
        mask, prunable = common.baseline_masks(c.prior.pruner, c.prior.sparsity, model, c.model.name,
                                               strategy, states, keys["mask"], keys["init"], pds)
        pcfg = pft.PFTConfig(estimator="concrete", estimator_options=(("tau", float(c.tau)),),
                             **c.pft.to_dict())
        p0 = train.map_seeds(functools.partial(pft.init, cfg=pcfg), (0, 0, 0, 0), strategy)(
            keys["pft"], states.params, states.batch_stats, mask)
        dens0 = jnp.full((c.num_seeds,), 1.0 - c.prior.sparsity)
        pst, _ = pft.fit(model, pcfg, p0, pds, keys["pft"], prunable, dens0, strategy=strategy,
                         batch_shards=cfg.batch_shards, chunk_steps=min(100, pcfg.steps),
                         checkpoint_dir=os.path.join(ckpt, "pft"), desc=f"prior mask α={alpha}")
        # Bound set padded to the full training-set length: one compiled fit for every alpha.
        bset = sb.bound_set(ds, split)
        n_bound = len(bset.y)
        pad = n_train - n_bound
        xb = jnp.asarray(np.concatenate([bset.x, np.zeros((pad,) + bset.x.shape[1:], bset.x.dtype)]))
        yb = jnp.asarray(np.concatenate([bset.y, np.zeros((pad,), bset.y.dtype)]))
        x_bound, y_bound = jnp.asarray(bset.x), jnp.asarray(bset.y)
        for variant in variants:
            grid = list(itertools.product(eps_list, scale_list if variant != "mask" else scale_list[:1]))
            grid_size = len(alphas) * len(grid)  # every value looked at, over all alphas
            scfg = _sb_config(c, variant, grid_size)
            flat, treedef = jax.tree.flatten(prunable)
            fit_fn = _compiled_fit(model, scfg, tuple(flat), treedef, strategy, cfg.batch_shards)
            eps_G = jnp.asarray([g[0] for g in grid], jnp.float32)
            ls_G = jnp.log(jnp.asarray([g[1] for g in grid], jnp.float32))
            t0 = time.perf_counter()
            st, m = fit_fn(keys["post"], pst.params, pst.logits, eps_G, ls_G, xb, yb, n_bound, obj_idx)
            jax.block_until_ready(st)
            fit_s = time.perf_counter() - t0
            # Selection by the bound-set objective (last 10% of steps): covered by the union bound.
            tail = max(1, scfg.steps // 10)
            sel = np.asarray(jnp.argmin(m["objective"][..., -tail:].mean(-1), axis=1))  # (S, O)
            posts = jax.tree.map(lambda v: v[np.arange(c.num_seeds)[:, None], sel,
                                             np.arange(len(objectives))[None, :]], st.posterior)
            # KL(Q‖P) of every selected (seed, objective) in one compiled call.
            kl_fn = train.map_seeds(jax.vmap(
                lambda q, w, s, e, ls: sb.kl_divergence(q, sb.make_prior(w, s, prunable, e, ls), prunable,
                                                        variant), in_axes=(0, None, None, 0, 0)),
                (0, 0, 0, 0, 0), strategy)
            kl_SO = np.asarray(kl_fn(posts, pst.params, pst.logits, eps_G[sel], ls_G[sel]), np.float64)
            t0 = time.perf_counter()
            err_SOM = _mc_errors(c, keys["mc"], posts, x_bound, y_bound, model=model,
                                 prunable=prunable, variant=variant, networks_per_batch=npb,
                                 strategy=strategy, desc=f"MC certificate {variant} α={alpha}")
            mc_s = time.perf_counter() - t0
            test_fn = train.map_seeds(jax.vmap(functools.partial(
                sb.sampled_errors, model=model, prunable=prunable, variant=variant,
                num_networks=int(c.test_samples), networks_per_batch=npb),
                in_axes=(None, 0, None, None)), (0, 0, None, None), strategy)
            stoch_SO = np.asarray(test_fn(keys["test"], posts, xt, yt).mean(-1))
            thr_fn = train.map_seeds(jax.vmap(functools.partial(
                sb.threshold_error, model=model, prunable=prunable), in_axes=(0, None, None)),
                (0, None, None), strategy)
            thr_SO = np.asarray(thr_fn(posts, xt, yt))
            dens_SO = np.asarray(jax.vmap(jax.vmap(lambda p: pft.density(p.mask_logits, prunable)))(posts))
            for o, obj in enumerate(objectives):
                certs = []
                for s in range(c.num_seeds):
                    certs.append(sb.certify(err_SOM[s, o], float(kl_SO[s, o]), split, delta=c.delta,
                                            delta_prime=c.delta_prime, grid_size=grid_size))
                cert = [x.risk_bound for x in certs]
                rows.append({
                    "alpha": alpha, "variant": variant, "objective": obj, "n": n_bound,
                    "m": certs[0].m, "mc_scheme": c.mc_scheme, "grid_size": grid_size,
                    "certificate": cert, **{f"certificate_{k}": v for k, v in common.summarize(cert).items()},
                    "stochastic_test_error": stoch_SO[:, o].tolist(),
                    "threshold_test_error": thr_SO[:, o].tolist(),
                    "mc_risk": [x.mc_risk for x in certs], "mc_risk_upper": [x.mc_risk_upper for x in certs],
                    "kl": [x.kl for x in certs], "expected_density": dens_SO[:, o].tolist(),
                    "selected_grid": [list(grid[sel[s, o]]) for s in range(c.num_seeds)],
                    "prior_test_error": hist[-1]["test_error"],
                    "final_objective": np.asarray(m["objective"][np.arange(c.num_seeds), sel[:, o], o, -1]).tolist(),
                    "split_hash": certs[0].split_hash, "prior_split_hash": certs[0].prior_split_hash,
                    "confidence": certs[0].confidence, "fit_seconds": fit_s, "mc_seconds": mc_s,
                })
            common.write_records(workdir, "results", rows)
    _report(workdir, c, rows, time.perf_counter() - t_start)
    return {"results": rows}


def _mc_errors(c: config_dict.ConfigDict, keys: jax.Array, posts, x: jax.Array, y: jax.Array, *,
               model, prunable, variant: str, networks_per_batch: int | None, strategy: str,
               desc: str) -> np.ndarray:
    """(S, O, M) Monte Carlo samples for the certificate of every (seed, objective), with a progress
    bar over host chunks (chunk i uses the keys fold_in(key, i), so all draws are independent).

    mc_scheme "networks": M = mc_samples bound-set error rates of networks h ~ Q (Dziugaite & Roy),
    in chunks of mc_chunk networks. "per_example": M = mc_repeats * n 0-1 losses, a fresh network
    per example and repeat (self_bounded.per_example_errors), one chunk per repeat.
    """
    fold = jax.vmap(jax.random.fold_in, (0, None))
    kw = dict(model=model, prunable=prunable, variant=variant)
    # x, y are jit arguments, not closed-over constants (XLA would constant-fold the whole bound set).
    axes = (None, 0, None, None)
    if c.mc_scheme == "per_example":
        fn = train.map_seeds(jax.vmap(functools.partial(sb.per_example_errors, repeats=1, **kw),
                                      in_axes=axes), (0, 0, None, None), strategy)
        out = [np.asarray(fn(fold(keys, i), posts, x, y))[:, :, 0]
               for i in train.progress_bar(range(int(c.mc_repeats)), desc=desc, unit="repeat")]
        return np.concatenate(out, axis=-1)
    if c.mc_scheme != "networks":
        raise ValueError(f"mc_scheme must be 'per_example' or 'networks', got {c.mc_scheme!r}")
    num = int(c.mc_samples)
    chunk = min(int(c.mc_chunk), num) if int(c.mc_chunk) > 0 else num
    fn = train.map_seeds(jax.vmap(functools.partial(
        sb.sampled_errors, num_networks=chunk, networks_per_batch=networks_per_batch, **kw),
        in_axes=axes), (0, 0, None, None), strategy)
    out = [np.asarray(fn(fold(keys, i), posts, x, y))
           for i in train.progress_bar(range(-(-num // chunk)), desc=desc,
                                       unit=f"x{chunk} nets")]
    return np.concatenate(out, axis=-1)[..., :num]


def _mean(v) -> float:
    return float(np.mean(v))


def _report(workdir: str, c: config_dict.ConfigDict, rows: list[dict[str, Any]], seconds: float) -> None:
    table = [{"alpha": r["alpha"], "variant": r["variant"], "objective": r["objective"],
              "certificate %": common.fmt_ci(common.summarize(r["certificate"])),
              "stoch. test err %": common.fmt_ci(common.summarize(r["stochastic_test_error"])),
              "thresh. test err %": common.fmt_ci(common.summarize(r["threshold_test_error"])),
              "MC bound-set err %": f"{100 * _mean(r['mc_risk']):.2f}",
              "KL": f"{_mean(r['kl']):.1f}", "ratio cert/stoch": f"{_mean(r['certificate']) / max(_mean(r['stochastic_test_error']), 1e-9):.2f}",
              "n": r["n"], "M": r["m"], "K": r["grid_size"]} for r in rows]
    best = min(rows, key=lambda r: _mean(r["certificate"]))
    text = (f"# PAC-Bayes self-bounded learning: {c.data.name}, {c.model.name}, {c.num_seeds} seeds\n\n"
            f"Confidence 1 - δ - δ' = {1 - c.delta - c.delta_prime:.3f} per certificate (kl bound; K grid "
            f"values in the union bound; Monte Carlo scheme {c.mc_scheme!r}, M samples). Prior test error (S_α-trained dense weights): "
            f"{100 * _mean(rows[0]['prior_test_error']):.2f} %. Wall time {seconds:.0f} s.\n\n"
            + common.markdown_table(table, list(table[0]))
            + f"\nLowest mean certificate: α={best['alpha']}, {best['variant']}, {best['objective']}: "
            f"{100 * _mean(best['certificate']):.2f} % (choosing it among all {len(rows)} rows would cost "
            f"another log {len(rows)} in the union bound).\n")
    common.write_text(workdir, "table.md", text)
    _plot(workdir, c, rows)


def _plot(workdir: str, c: config_dict.ConfigDict, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants, objectives = common.parse_list(c.variants), common.parse_list(c.objectives)
    alphas = common.parse_list(c.alphas, float)
    a_ref = 0.5 if 0.5 in alphas else alphas[0]
    fig, axes = plt.subplots(1, len(variants), figsize=(4.5 * len(variants), 3.8), squeeze=False)
    for ax, v in zip(axes[0], variants):
        sel = {r["objective"]: r for r in rows if r["variant"] == v and r["alpha"] == a_ref}
        xs = np.arange(len(objectives))
        for j, (key, label) in enumerate((("certificate", "certificate"),
                                          ("stochastic_test_error", "stochastic test error"),
                                          ("threshold_test_error", "thresholded test error"))):
            vals = [100 * _mean(sel[o][key]) for o in objectives]
            ax.bar(xs + (j - 1) * 0.27, vals, width=0.27, label=label)
        ax.set_xticks(xs, objectives)
        ax.set_title(f"variant {v} (α={a_ref})")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "certificates.png"), dpi=110)
    plt.close(fig)
    series = {}
    for v, o in itertools.product(variants, objectives):
        sel = sorted((r for r in rows if r["variant"] == v and r["objective"] == o), key=lambda r: r["alpha"])
        if sel:
            s = [common.summarize(r["certificate"]) for r in sel]
            series[f"{v}/{o}"] = ([r["alpha"] for r in sel], [x["mean"] for x in s],
                                  [x["ci_lo"] for x in s], [x["ci_hi"] for x in s])
    common.plot_lines(os.path.join(workdir, "alpha.png"), series, xlabel="prior fraction α",
                      ylabel="certificate (0-1 risk bound)", title=f"{c.data.name}: certificate against α")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    common.init_devices()  # multi-host runtime if configured; several devices -> seeds sharded
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", "workdirs/pac_bayes", "Output directory.")
    app.run(main)
