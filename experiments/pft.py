"""Probabilistic fine-tuning (PFT) of baseline masks: the main job.

  python -m experiments.pft --workdir=workdirs/pft                       # mnist1d MLP, 4 seeds, < 5 min CPU
  python -m experiments.pft --config.estimators=concrete,rloo,disarm --config.pft.num_samples=8
  python -m experiments.pft --config.preset=mnist   --workdir=workdirs/pft_mnist    # paper-like, GPU
  python -m experiments.pft --config.preset=cifar10 --workdir=workdirs/pft_cifar10  # paper-like, GPU

For each seed (all seeds run at once): train a dense network, prune it with each baseline (magnitude,
SNIP, random) at each sparsity, then compare at equal sparsity
  baseline          the baseline mask on the trained weights, as is;
  baseline_ft       the baseline mask with its weights fine-tuned for as many steps as PFT takes;
  pft_stochastic    the PFT stochastic network: mean test error over sampled masks (and its ensemble);
  pft_topk          the PFT mask thresholded to the top-k keep probabilities at the baseline's sparsity;
  pft_half          p > 1/2 (its own sparsity is reported).
Writes config.json, dense.jsonl/csv, results.jsonl/csv (per-seed errors, mean, 95% CI), table.md,
errors.png (test error against sparsity per pruner), estimators.jsonl and estimators.png (gradient
variance and wall time per step per estimator), and checkpoints under ckpt/.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_dict, config_flags

from experiments import common
from jaxprune import masks, pft, train


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.preset = ""  # "", "mnist" or "cifar10" (the paper-like GPU settings; see _apply_preset)
    c.seed = 0
    c.num_seeds = 4  # leading axis S of every result array
    c.data = config_dict.create(name="mnist1d", data_dir="", num_train=0, num_test=0, num_samples=4000)
    c.model = config_dict.create(name="mlp", kwargs=config_dict.create(widths=(128, 128)))
    c.train = config_dict.create(  # dense training; fields of jaxprune.train.TrainConfig
        optimizer="adam", learning_rate=2e-3, momentum=0.9, weight_decay=0.0, batch_size=128, epochs=40,
        steps_per_epoch=0, eval_batch_size=1000, seed_strategy="auto", checkpoint_every=10,
        batch_shards=1)  # "sharded" only: each seed's batch split over this many devices
    c.pruners = "magnitude,snip,random"  # names in jaxprune.pruners.PRUNERS
    c.sparsities = "0.8,0.9,0.95"
    c.snip_at = "init"  # SNIP scores at initialisation (original) or at the trained weights
    c.estimators = "concrete_st,rloo"  # names in jaxprune.estimators.ESTIMATORS
    c.pft = config_dict.create(  # fields of jaxprune.pft.PFTConfig (estimator set per run)
        num_samples=4, s0=3.0, learning_rate=0.05, steps=300, batch_size=128, joint=False,
        weight_lr=1e-4, budget_weight=100.0)
    c.tau = 0.5  # temperature of the relaxed (concrete) estimators
    c.threshold_scope = "global"  # top-k by p over all layers ("global") or per layer ("layer")
    c.finetune_lr = 1e-3  # baseline_ft: Adam on the masked weights, same number of steps as PFT
    c.chunk_steps = 100  # steps per jitted chunk (progress, checkpoints)
    c.eval_masks = 16  # sampled masks for the stochastic test error
    c.variance_repeats = 16  # gradient estimates per estimator for the variance plot
    c.quick = False  # tests: digits, 2 seeds, a handful of steps
    return c


def _apply_preset(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    c = config_dict.ConfigDict(c.to_dict())
    if c.quick:
        c.num_seeds = 2
        c.data = config_dict.create(name="digits", data_dir="", num_train=0, num_test=0, num_samples=0)
        c.model.kwargs.widths = (32,)
        c.train.epochs = 3
        c.train.batch_size = 64
        c.pruners = "magnitude,random"
        c.sparsities = "0.8"
        c.estimators = "concrete,rloo"
        c.pft.steps = 20
        c.pft.batch_size = 64
        c.chunk_steps = 10
        c.eval_masks = 4
        c.variance_repeats = 4
    elif c.preset == "mnist":  # LeNet-300-100 on MNIST (tfds or IDX files), GPU scale
        c.data = config_dict.create(name="mnist", data_dir=c.data.data_dir, num_train=0, num_test=0, num_samples=0)
        c.model = config_dict.create(name="lenet300_100", kwargs=config_dict.create())
        c.train.epochs = 30
        c.sparsities = "0.8,0.9,0.95,0.98"
        c.pft.steps = 3000
        c.num_seeds = 8
    elif c.preset == "cifar10":  # ResNet20 on CIFAR-10 through tfds (needs a prepared data_dir), GPU
        c.data = config_dict.create(name="tfds:cifar10", data_dir=c.data.data_dir, num_train=0, num_test=0,
                                    num_samples=0)
        c.model = config_dict.create(name="resnet20", kwargs=config_dict.create())
        c.train.update(optimizer="sgd", learning_rate=0.05, epochs=60, batch_size=128)
        c.sparsities = "0.8,0.9,0.95,0.98"
        c.pft.steps = 5000
        c.num_seeds = 4
    elif c.preset:
        raise ValueError(f"unknown preset {c.preset!r}; known: '', 'mnist', 'cifar10'")
    return c


def _pft_config(c: config_dict.ConfigDict, estimator: str) -> pft.PFTConfig:
    opts = (("tau", float(c.tau)),) if estimator.startswith("concrete") else ()
    return pft.PFTConfig(estimator=estimator, estimator_options=opts, **c.pft.to_dict())


def _row(pruner, sp, method, errors, **extra) -> dict[str, Any]:
    errs = np.asarray(errors, np.float64).tolist()
    return {"pruner": pruner, "sparsity": sp, "method": method, "test_error": errs,
            **common.summarize(errs), **extra}


def _grad_variance(model, cfg: pft.PFTConfig, state0: pft.PFTState, prunable, x, y, repeats: int) -> dict[str, float]:
    """Total variance sum_i Var(g_i) of the logit-gradient estimate over `repeats` keys, on one batch."""
    estimator = cfg.get_estimator()
    loss_fn = pft.batch_loss_fn(model, state0.batch_stats, x, y)

    @jax.jit
    def one(k):
        e = estimator(lambda m: loss_fn(m, state0.params), state0.logits, k, cfg.num_samples,
                      estimator.init(state0.logits), prunable=prunable)
        return jax.flatten_util.ravel_pytree(e.grads)[0]

    g = jax.lax.map(one, jax.random.split(jax.random.key(123), repeats))
    g.block_until_ready()
    return {"total_variance": float(jnp.sum(jnp.var(g, 0, ddof=1))),
            "mean_grad_sq_norm": float(jnp.sum(jnp.mean(g, 0) ** 2))}


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the study; returns {"dense": summary, "results": rows, "estimators": rows}."""
    import jax.flatten_util  # noqa: F401  (used by _grad_variance)

    c = _apply_preset(config)
    common.setup_workdir(c, workdir)
    ds = common.load_data(c.data)
    model = common.make_model(c.model, ds.num_classes)
    cfg = train.TrainConfig.from_dict(c.train)
    strategy = train.resolve_strategy(cfg.seed_strategy, c.model.name)
    keys = common.seed_streams(c.seed, c.num_seeds, ("init", "data", "mask", "finetune", "pft", "eval"))
    ckpt = os.path.join(workdir, "ckpt")
    states, hist = common.train_dense(model, c.model.name, cfg, ds, keys["init"], keys["data"], os.path.join(ckpt, "dense"))
    common.write_records(workdir, "dense", hist)
    dense = common.summarize(hist[-1]["test_error"])

    chunk = min(c.chunk_steps, c.pft.steps)
    ft_cfg = train.TrainConfig(**{**cfg.__dict__, "epochs": max(1, c.pft.steps // chunk), "steps_per_epoch": chunk,
                                  "learning_rate": c.finetune_lr, "optimizer": "adam", "checkpoint_every": 1})
    tx_ft = train.make_optimizer(ft_cfg)
    start_ft = train.map_seeds(lambda k, p, bs, m: train.state_from_params(k, p, bs, tx_ft, m), (0, 0, 0, 0), strategy)
    xt, yt = jnp.asarray(ds.test.x), jnp.asarray(ds.test.y)
    eval_mask = train.map_seeds(
        lambda p, bs, m: train.error_rate(train.predict(model, p, bs, m, xt, cfg.eval_batch_size), yt),
        (0, 0, 0), strategy)
    # Compiled once per run: sparsity is a traced argument of the thresholds, the estimator a static one.
    stoch_fn = train.map_seeds(
        lambda p, bs, s, k: pft.evaluate_stochastic(model, p, bs, s, prunable_of(states), k, xt, yt, c.eval_masks,
                                                    cfg.eval_batch_size), (0, 0, 0, 0), strategy)
    topk_fn = jax.jit(jax.vmap(lambda s, sp: pft.threshold_topk(s, prunable_of(states), sp, c.threshold_scope),
                               in_axes=(0, None)))
    half_fn = jax.jit(jax.vmap(lambda s: pft.threshold_half(s, prunable_of(states))))
    sparsity_fn = jax.jit(jax.vmap(lambda m: masks.sparsity(m, prunable_of(states))))
    init_fns = {}
    rows: list[dict[str, Any]] = []
    est_rows: list[dict[str, Any]] = []
    estimators = common.parse_list(c.estimators)
    pruner_list, sparsities = common.parse_list(c.pruners), common.parse_list(c.sparsities, float)
    for pruner in pruner_list:
        for sp in sparsities:
            first = pruner == pruner_list[0] and sp == sparsities[0]
            mask, prunable = common.baseline_masks(pruner, sp, model, c.model.name, strategy, states, keys["mask"],
                                                   keys["init"], ds, snip_at=c.snip_at)
            density0 = 1.0 - sparsity_fn(mask)
            rows.append(_row(pruner, sp, "baseline", eval_mask(states.params, states.batch_stats, mask)))
            ft0 = start_ft(keys["finetune"], states.params, states.batch_stats, mask)
            tuned, _ = train.fit(model, ft_cfg, ft0, ds, keys["finetune"], model_name=c.model.name,
                                 checkpoint_dir=os.path.join(ckpt, f"ft_{pruner}_{sp}"), desc=f"ft {pruner} {sp}")
            rows.append(_row(pruner, sp, "baseline_ft", eval_mask(tuned.params, tuned.batch_stats, tuned.mask)))
            for name in estimators:
                pcfg = _pft_config(c, name)
                if name not in init_fns:
                    init_fns[name] = train.map_seeds(functools.partial(pft.init, cfg=pcfg), (0, 0, 0, 0), strategy)
                p0 = init_fns[name](keys["pft"], states.params, states.batch_stats, mask)
                if first:
                    var = _grad_variance(model, pcfg, jax.tree.map(lambda v: v[0], p0), prunable,
                                         jnp.asarray(ds.train.x[: pcfg.batch_size]),
                                         jnp.asarray(ds.train.y[: pcfg.batch_size]), c.variance_repeats)
                t0 = time.perf_counter()
                pst, phist = pft.fit(model, pcfg, p0, ds, keys["pft"], prunable, density0, strategy=strategy,
                                     batch_shards=cfg.batch_shards, chunk_steps=chunk,
                                     checkpoint_dir=os.path.join(ckpt, f"pft_{name}_{pruner}_{sp}"),
                                     desc=f"pft {name} {pruner} {sp}")
                if first:
                    steady = [h["seconds_per_step"] for h in phist[1:]] or [phist[-1]["seconds_per_step"]]
                    est_rows.append({"estimator": name, "num_samples": pcfg.num_samples, **var,
                                     "seconds_per_step": float(np.median(steady)), "num_seeds": c.num_seeds,
                                     "strategy": strategy, "wall_seconds": time.perf_counter() - t0})
                stoch = stoch_fn(pst.params, pst.batch_stats, pst.logits, keys["eval"])
                tag = f"pft[{name}]"
                dens = [float(d) for d in phist[-1]["density"]]
                rows.append(_row(pruner, sp, f"{tag}_stochastic", stoch["mean_error"], expected_density=dens))
                rows.append(_row(pruner, sp, f"{tag}_ensemble", stoch["ensemble_error"]))
                topk = topk_fn(pst.logits, sp)
                rows.append(_row(pruner, sp, f"{tag}_topk", eval_mask(pst.params, pst.batch_stats, topk),
                                 overlap_with_baseline=_overlap(topk, mask, prunable)))
                half = half_fn(pst.logits)
                rows.append(_row(pruner, sp, f"{tag}_half", eval_mask(pst.params, pst.batch_stats, half),
                                 achieved_sparsity=np.asarray(sparsity_fn(half)).tolist()))
            common.write_records(workdir, "results", rows)
    common.write_records(workdir, "estimators", est_rows)
    _report(workdir, c, dense, rows, est_rows, estimators)
    return {"dense": dense, "results": rows, "estimators": est_rows}


def prunable_of(states) -> Any:
    """The prunable-leaf flags of the (seed-stacked) params: Dense/Conv kernels."""
    return masks.prunable_tree(jax.tree.map(lambda v: v[0], states.params))


def _overlap(a, b, prunable) -> list[float]:
    """Per seed: fraction of the baseline's kept weights that the thresholded PFT mask also keeps."""
    def one(ma, mb):
        la = masks._prunable_leaves(ma, prunable)
        lb = masks._prunable_leaves(mb, prunable)
        both = sum(jnp.sum(x * y) for (_, x), (_, y) in zip(la, lb))
        return both / sum(jnp.sum(y) for _, y in lb)

    return np.asarray(jax.vmap(one)(a, b)).tolist()


def _report(workdir, c, dense, rows, est_rows, estimators) -> None:
    table = [{"pruner": r["pruner"], "sparsity": r["sparsity"], "method": r["method"],
              "test error % (95% CI)": common.fmt_ci(r)} for r in rows]
    gains = []
    by = {(r["pruner"], r["sparsity"], r["method"]): r for r in rows}
    for (pr, sp, m), r in by.items():
        if m.endswith("_topk"):
            for ref in ("baseline", "baseline_ft"):
                d = np.asarray(by[(pr, sp, ref)]["test_error"]) - np.asarray(r["test_error"])
                s = common.summarize(d)
                gains.append({"pruner": pr, "sparsity": sp, "pft": m, "vs": ref,
                              "error reduction, points (95% CI)": common.fmt_ci(s)})
    text = (f"# PFT: {c.data.name}, {c.model.name}, {c.num_seeds} seeds, {c.pft.steps} steps, "
            f"K={c.pft.num_samples}\n\nDense test error: {common.fmt_ci(dense)} %\n\n"
            + common.markdown_table(table, list(table[0]))
            + "\n## PFT thresholded (top-k at the baseline's sparsity) against the baselines\n\n"
            + "Positive = PFT has lower test error; paired over seeds.\n\n"
            + common.markdown_table(gains, list(gains[0]) if gains else [])
            + "\n## Estimators\n\n" + common.markdown_table(est_rows, list(est_rows[0]) if est_rows else []))
    common.write_text(workdir, "table.md", text)
    _plot(workdir, c, dense, rows, estimators, est_rows)


def _plot(workdir, c, dense, rows, estimators, est_rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pruners = common.parse_list(c.pruners)
    methods = ["baseline", "baseline_ft"] + [f"pft[{e}]_{k}" for e in estimators for k in ("stochastic", "topk")]
    fig, axes = plt.subplots(1, len(pruners), figsize=(5 * len(pruners), 4), squeeze=False)
    for ax, pr in zip(axes[0], pruners):
        for m in methods:
            sel = sorted((r for r in rows if r["pruner"] == pr and r["method"] == m), key=lambda r: r["sparsity"])
            if not sel:
                continue
            x = [r["sparsity"] for r in sel]
            ax.errorbar(x, [100 * r["mean"] for r in sel],
                        yerr=[[100 * (r["mean"] - r["ci_lo"]) for r in sel], [100 * (r["ci_hi"] - r["mean"]) for r in sel]],
                        marker="o", capsize=3, label=m)
        ax.axhline(100 * dense["mean"], color="k", ls="--", lw=1, label="dense")
        ax.set_title(f"{pr}")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("test error (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{c.data.name} / {c.model.name}: mean and 95% CI over {c.num_seeds} seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "errors.png"), dpi=110)
    plt.close(fig)
    if est_rows:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        names = [r["estimator"] for r in est_rows]
        a1.bar(names, [r["total_variance"] for r in est_rows])
        a1.set_yscale("log")
        a1.set_title("total variance of the logit gradient")
        a2.bar(names, [1e3 * r["seconds_per_step"] for r in est_rows])
        a2.set_title(f"ms per step ({c.num_seeds} seeds, K={c.pft.num_samples})")
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, "estimators.png"), dpi=110)
        plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    common.init_devices()  # multi-host runtime if configured; several devices -> seeds sharded
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", "workdirs/pft", "Output directory.")
    app.run(main)
