"""Generalization-stability tradeoff of iterative structured pruning (Bartoldson et al. 2020, Fig. 2-3).

  python -m experiments.stability --workdir=workdirs/stability        # CPU default, see below
  python -m experiments.stability --config.preset=vgg11 --config.data.data_dir=DIR   # GPU, paper VGG11
  python -m experiments.stability --config.preset=resnet18 --config.data.data_dir=DIR

CPU default: small VGG-style CNN with BatchNorm (6 convs 8-8-16-16-32-32, 2x2 max-pool after each
pair, dense 64) on a 1024/1000 subset of Fashion-MNIST averaged to 14x14 (digits if the IDX files are
missing), Adam 1e-3, batch 64, no augmentation, 12 epochs (lr x 0.1 after epoch 10). The last four
convs are pruned by 30/30/30/60 % (the paper's VGG totals except 60 % instead of 90 % for the last,
32-filter conv: 90 % left 4 filters and the runs never recovered; README, "CPU default"),
staggered starts at epochs 1-4, ends 4/4/4/6 (0-based). Configurations: no pruning + targets S/R/L
x retrain periods 1 and 4 (low and high iterative rate), 8 seeds each = 56 runs, all one compiled
program. About 16 min on the shared 2-core machine under load average ~10 (less on idle cores).
GPU presets use the paper's VGG11 / ResNet18 CIFAR-10 setups (325 epochs, lr drops at 150 and 300).

Writes to workdir: config.json; history.jsonl/csv (per epoch: per-run t_pre, t_post, train accuracy);
runs.jsonl/csv (one line per run, see `_run_records`: run, config, target, period, rate, seed,
mean_stability, best_test, best_epoch, train_at_best, gap, final_test, kept per layer, checkpoint,
index); summary.jsonl; table.md; curves.png (test accuracy with pruning drops marked);
scatter.png (stability vs generalisation, Pearson r / p); rate_sweep.png (stability and accuracy vs
iterative rate for S, R, L); ckpt/ (orbax checkpoints of the stacked final RunStates: run `index` i is
row i of every leaf; restore with `load_states`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_dict, config_flags

from experiments import common, gst
from jaxprune import models, schedules, scoring, stats, train

TARGET_NAMES = {scoring.SMALLEST: "S", scoring.RANDOM: "R", scoring.LARGEST: "L"}


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.seed = 0
    c.num_seeds = 8  # seeds per configuration (the same S init/data seeds are reused by every config)
    c.preset = "cpu"  # "cpu" (this config), "cpu_overfit" (512 images, 30 epochs, wider last convs,
    # 90 % last layer: the unpruned net reaches 100 % train accuracy), "cpu_wide" (cpu_overfit with
    # 2x wider pruned convs, 8-8-32-32-128-128), "vgg11" or "resnet18" (paper
    # CIFAR-10 setups; see _preset)
    c.data = config_dict.create(name="fashion_mnist", data_dir="", num_train=1024, num_test=1000,
                                num_samples=0, downsample=2, fallback="digits")
    # conv_impl "auto" on CPU is "canonical" or "shifts" per layer (models/layers.py). Results
    # committed before 2026-11-29 21:00 UTC used "shifts" everywhere, and before 2026-11-28 11:00 UTC
    # "xla": pass --config.model.kwargs.conv_impl=shifts (or xla) to reproduce them to the bit.
    c.model = config_dict.create(name="small_cnn", kwargs=config_dict.create(
        channels=(8, 8, 16, 16, 32, 32), dense=64, batch_norm=True, conv_impl="auto"))
    # Pruned conv units (names from models.conv_units) with total fraction, first and last epoch.
    c.layers = config_dict.create(names="conv3,conv4,conv5,conv6", fractions="0.3,0.3,0.3,0.6",
                                  starts="1,2,3,4", ends="4,4,4,6")
    c.targets = "S,R,L"  # pruning targets (smallest / random / largest score)
    c.periods = "1,4"  # retrain periods in epochs: small period = low iterative rate
    c.baseline = True  # also train an unpruned configuration
    c.scoring = "l2"  # one of gst.SCORINGS
    c.train = config_dict.create(optimizer="adam", learning_rate=1e-3, momentum=0.9, batch_size=64,
                                 epochs=12, lr_milestones="10", eval_batch_size=250,
                                 seed_strategy="auto", checkpoint_every=3,
                                 batch_shards=1)  # "sharded" only: each run's batch over k devices
    c.quick = False  # tests: digits, tiny CNN, 2 seeds, 4 epochs
    return c


def _preset(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """quick / vgg11 / resnet18 overrides (seed, num_seeds, data_dir, strategy stay as given)."""
    c = config_dict.ConfigDict(c.to_dict())
    if c.quick:
        c.num_seeds = 2
        c.data = config_dict.create(name="digits", data_dir="", num_train=512, num_test=0,
                                    num_samples=0, downsample=1, fallback="")
        c.model.kwargs = config_dict.create(channels=(4, 4, 8, 8), dense=16, batch_norm=True,
                                            conv_impl=c.model.kwargs.get("conv_impl", "auto"))
        c.layers = config_dict.create(names="conv3,conv4", fractions="0.5,0.75", starts="0,1",
                                      ends="2,2")
        c.targets, c.periods = "S,L", "1,3"
        c.train.epochs, c.train.batch_size, c.train.lr_milestones = 4, 128, "3"
        c.train.checkpoint_every = 2
    elif c.preset == "cpu_overfit":  # the paper's regime, scaled down: the unpruned net hits 100 % train
        c.data.update(num_train=512, num_test=500)
        c.model.kwargs.channels = (8, 8, 16, 16, 64, 64)  # wide last convs: room to prune 90 %
        c.layers.update(fractions="0.3,0.3,0.3,0.9", starts="1,2,3,4", ends="8,8,8,12")
        c.train.update(epochs=30, lr_milestones="25")
    elif c.preset == "cpu_wide":  # cpu_overfit with 2x wider pruned convs: 90 % of conv6 keeps 13
        c.data.update(num_train=512, num_test=500)
        c.model.kwargs.channels = (8, 8, 32, 32, 128, 128)
        c.layers.update(fractions="0.3,0.3,0.3,0.9", starts="1,2,3,4", ends="8,8,8,12")
        c.train.update(epochs=30, lr_milestones="25")
    elif c.preset in ("vgg11", "resnet18"):
        c.data.update(name="tfds:cifar10", num_train=0, num_test=0, downsample=1, fallback="")
        c.train.update(optimizer="adam", learning_rate=1e-3, batch_size=128, epochs=325,
                       lr_milestones="150,300", eval_batch_size=1000, checkpoint_every=25)
        c.targets, c.periods, c.baseline = "S,R,L", "4,40", True
        paper = schedules.PAPER_LAYERS[c.preset]
        fmt = lambda v: ",".join(str(x) for x in v)  # noqa: E731
        names = ("conv5,conv6,conv7,conv8" if c.preset == "vgg11" else
                 "stage4_block1_conv1,stage4_block1_conv2,stage4_block2_conv1,stage4_block2_conv2")
        c.layers = config_dict.create(names=names, fractions=fmt(paper["fractions"]),
                                      starts=fmt(paper["starts"]), ends=fmt(paper["ends"]))
        c.model = config_dict.create(name="vgg11_bn" if c.preset == "vgg11" else "resnet18",
                                     kwargs=config_dict.create(conv_impl=c.model.kwargs.get(
                                         "conv_impl", "auto")))
        if c.preset == "resnet18":  # the paper masks the shortcut on pruned conv2 channels
            c.model.kwargs.mask_shortcut = True
    elif c.preset != "cpu":
        raise ValueError("preset must be 'cpu', 'cpu_overfit', 'cpu_wide', 'vgg11' or 'resnet18', "
                         f"got {c.preset!r}")
    return c


def make_runs(c: config_dict.ConfigDict, layers_for) -> list[dict[str, Any]]:
    """One dict per configuration: label, target code, period (0 = none), (E, L) count table, rate."""
    E = c.train.epochs
    n_layers = len(common.parse_list(c.layers.names))
    out = []
    if c.baseline:
        out.append(dict(config="none", target=-1, period=0, rate=0.0,
                        counts=np.zeros((E, n_layers), np.int32)))
    for p in common.parse_list(c.periods, int):
        layers = layers_for(p)
        table = schedules.count_table(layers, E)
        rate = max(s.iterative_rate for s in layers)  # the paper's legends quote the largest rate
        for t in common.parse_list(c.targets):
            code = scoring.target_code(t)
            out.append(dict(config=f"{TARGET_NAMES[code]}_r{p}", target=code, period=p,
                            rate=100 * rate, counts=table))
    return out


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains every configuration x seed; writes the files listed in the module docstring."""
    c = _preset(config)
    common.setup_workdir(c, workdir)
    ckpt = gst.setup_dirs(workdir)
    ds = gst.load_data(c.data)
    model = common.make_model(c.model, ds.num_classes)
    strategy = train.resolve_strategy(c.train.seed_strategy, c.model.name)
    steps = ds.train.x.shape[0] // c.train.batch_size
    tx = gst.make_tx(c.train, steps)
    sample_x = jnp.asarray(ds.train.x[:1])
    params0 = model.init(jax.random.key(0), sample_x)["params"]
    all_units = models.conv_units(model, params0)
    units = gst.pruned_units(all_units, common.parse_list(c.layers.names))
    configs = make_runs(c, lambda p: gst.layer_schedules(c.layers, all_units, params0, p))

    S = c.num_seeds
    keys = common.seed_streams(c.seed, S, ("init", "data", "prune"))
    rep = lambda k: jnp.concatenate([k] * len(configs))  # noqa: E731  paired seeds across configs
    specs = gst.stack([gst.make_spec(target=max(cf["target"], 0), permanent=cf["period"] > 0)
                       for cf in configs for _ in range(S)])
    counts = np.stack([cf["counts"] for cf in configs for _ in range(S)])  # (R, E, L)
    init_fn = train.map_seeds(functools.partial(gst.init_run, model=model, sample_x=sample_x, tx=tx,
                                                units=units), (0,), strategy)
    states = init_fn(rep(keys["init"]))
    states, hist = gst.train_runs(
        model=model, tx=tx, units=units, scoring_name=c.scoring, states=states, specs=specs,
        counts=counts, ds=ds, data_keys=rep(keys["data"]), prune_keys=rep(keys["prune"]),
        batch_size=c.train.batch_size, eval_batch_size=c.train.eval_batch_size, strategy=strategy,
        noise=False, ckpt_dir=os.path.join(ckpt, "runs"), checkpoint_every=c.train.checkpoint_every,
        batch_shards=c.train.batch_shards,
        desc=f"stability ({len(configs)} configs x {S} seeds)")

    recs = _run_records(configs, S, counts, hist, states, units, "ckpt/runs")
    common.write_records(workdir, "runs", recs)
    common.write_records(workdir, "history", [
        {"epoch": e + 1, **{k: hist[k][:, e] for k in ("t_pre", "t_post", "train_acc", "train_loss")},
         "pruned": hist["pruned"][:, e].sum(-1)} for e in range(counts.shape[1])])
    summary, corr = _summaries(configs, recs)
    common.write_records(workdir, "summary", summary + corr)
    _report(workdir, c, configs, S, hist, counts, summary, corr, recs, ds.name)
    return {"runs": recs, "summary": summary, "correlations": corr}


def _run_records(configs, S, counts, hist, states, units, ckpt_rel) -> list[dict[str, Any]]:
    recs = []
    for i in range(counts.shape[0]):
        cf = configs[i // S]
        is_event = schedules.pruning_epochs(counts[i])
        last = schedules.last_pruning_epoch(counts[i])
        stab = float(scoring.mean_stability(hist["t_pre"][i], hist["t_post"][i], is_event))
        g = scoring.generalization(hist["t_post"][i], hist["train_acc"][i], last)
        kept = {f"kept_{u.name}": int(np.asarray(states.alive[u.name][i]).sum()) for u in units}
        recs.append(dict(run=i, config=cf["config"], target=TARGET_NAMES.get(cf["target"], "none"),
                         period=cf["period"], rate=cf["rate"], seed=i % S, mean_stability=stab,
                         best_test=float(g.best_test), best_epoch=int(g.best_epoch) + 1,
                         train_at_best=float(g.train_at_best), gap=float(g.gap),
                         final_test=float(hist["t_post"][i, -1]), num_events=int(is_event.sum()),
                         **kept, checkpoint=ckpt_rel, index=i))
    return recs


def _summaries(configs, recs):
    summary = []
    for cf in configs:
        rs = [r for r in recs if r["config"] == cf["config"]]
        row = dict(kind="config", config=cf["config"], rate=cf["rate"], n=len(rs))
        for k in ("mean_stability", "best_test", "gap"):
            row.update({f"{k}_{a}": v for a, v in common.summarize([r[k] for r in rs]).items()})
        summary.append(row)
    pruned = [r for r in recs if r["period"] > 0]
    groups = [("all pruned runs", pruned)]
    groups += [(f"rate {p:.3g}%", [r for r in pruned if r["rate"] == p])
               for p in sorted({r["rate"] for r in pruned})]
    corr = []
    for label, rs in groups:
        if len(rs) < 3:
            continue
        x, y = [r["mean_stability"] for r in rs], [r["best_test"] for r in rs]
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        p, k = stats.pearson(x, y), stats.kendall(x, y)
        gap = stats.pearson(x, [r["gap"] for r in rs])
        corr.append(dict(kind="correlation", group=label, n=p.n, pearson_r=p.stat, pearson_p=p.pvalue,
                         ci_low=p.ci_low, ci_high=p.ci_high, kendall_tau=k.stat, kendall_p=k.pvalue,
                         gap_pearson_r=gap.stat, gap_pearson_p=gap.pvalue))
    return summary, corr


def _report(workdir, c, configs, S, hist, counts, summary, corr, recs, data_name) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ci(s: dict[str, Any], key: str, scale: float = 100.0) -> str:
        return common.fmt_ci({a: s[f"{key}_{a}"] for a in ("mean", "ci_lo", "ci_hi")}, scale)

    rows = [{"config": s["config"], "rate %": f"{s['rate']:.3g}", "n": s["n"],
             "stability %": ci(s, "mean_stability", 1.0),
             "best test % (>= last prune)": ci(s, "best_test"), "gap %": ci(s, "gap")}
            for s in summary]
    crow = [{"group": r["group"], "n": r["n"], "Pearson r": r["pearson_r"], "p": r["pearson_p"],
             "95% CI": f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]", "Kendall tau": r["kendall_tau"],
             "p (tau)": r["kendall_p"], "r(stab, gap)": r["gap_pearson_r"]} for r in corr]
    text = (f"# Generalization-stability: {data_name}, {c.model.name}, {len(configs)} configs x {S} seeds"
            f" = {len(recs)} runs\n\nMean and 95% t-interval over seeds. Stability = 100 (1 - mean "
            "instability over pruning epochs); best test = max test accuracy at or after the last "
            "pruning epoch; gap = train - test accuracy there (train = mean over that epoch's batches)."
            "\n\n" + common.markdown_table(rows, list(rows[0]))
            + "\n## Stability vs generalisation (best test accuracy)\n\n"
            + (common.markdown_table(crow, list(crow[0])) if crow else "(too few pruned runs)\n")
            + "\nPaper (30 runs each): VGG11 r = -0.73, p = 4.4e-6; ResNet18 r = -0.43, p = 0.015.\n")
    common.write_text(workdir, "table.md", text)

    epochs = np.arange(1, counts.shape[1] + 1)
    fig, ax = plt.subplots(figsize=(8, 5))
    for j, cf in enumerate(configs):
        sl = slice(j * S, (j + 1) * S)
        col = f"C{j}"
        ax.plot(epochs, 100 * hist["t_post"][sl].mean(0), color=col, label=cf["config"])
        ev = np.flatnonzero(schedules.pruning_epochs(cf["counts"]))
        pre, post = 100 * hist["t_pre"][sl].mean(0), 100 * hist["t_post"][sl].mean(0)
        ax.vlines(ev + 1, post[ev], pre[ev], color=col, lw=2)
        ax.scatter(ev + 1, post[ev], color=col, marker="v", s=14)
    ax.set_xlabel("epoch (pruning events: drop from pre- to post-pruning accuracy, v)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"mean over {S} seeds")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "curves.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for j, cf in enumerate(configs):
        rs = [r for r in recs if r["config"] == cf["config"]]
        ax.scatter([r["mean_stability"] for r in rs], [100 * r["best_test"] for r in rs], color=f"C{j}",
                   label=cf["config"], s=16)
    if corr:
        r0 = corr[0]
        ax.set_title(f"pruned runs: Pearson r = {r0['pearson_r']:.2f}, p = {r0['pearson_p']:.2g} "
                     f"(n = {r0['n']})", fontsize=9)
    ax.set_xlabel("mean stability (%)")
    ax.set_ylabel("best test accuracy after last pruning (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "scatter.png"), dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for t in common.parse_list(c.targets):
        name = TARGET_NAMES[scoring.target_code(t)]
        ss = sorted((s for s in summary if s["config"].startswith(name + "_r")), key=lambda s: s["rate"])
        rates = [s["rate"] for s in ss]
        for ax, key, scale in ((axes[0], "mean_stability", 1.0), (axes[1], "best_test", 100.0)):
            m = np.array([s[f"{key}_mean"] for s in ss]) * scale
            lo = np.array([s[f"{key}_ci_lo"] for s in ss]) * scale
            hi = np.array([s[f"{key}_ci_hi"] for s in ss]) * scale
            ax.errorbar(rates, m, yerr=[m - lo, hi - m], marker="o", capsize=3, label=f"Prune_{name}")
    base = [s for s in summary if s["config"] == "none"]
    if base:
        axes[1].axhline(100 * base[0]["best_test_mean"], color="k", ls="--", lw=1, label="no pruning")
    axes[0].set_ylabel("mean stability (%)")
    axes[1].set_ylabel("best test accuracy (%)")
    for ax in axes:
        ax.set_xlabel("iterative pruning rate (% of layer per event, largest layer)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "rate_sweep.png"), dpi=120)
    plt.close(fig)


def load_states(config: config_dict.ConfigDict, workdir: str) -> tuple[gst.RunState, list[dict]]:
    """Final stacked RunStates of a finished `run` (row i = run i of runs.jsonl) and the run records."""
    import json

    c = _preset(config)
    ds = gst.load_data(c.data)
    model = common.make_model(c.model, ds.num_classes)
    steps = ds.train.x.shape[0] // c.train.batch_size
    tx = gst.make_tx(c.train, steps)
    sample_x = jnp.asarray(ds.train.x[:1])
    with open(os.path.join(workdir, "runs.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    params0 = model.init(jax.random.key(0), sample_x)["params"]
    units = gst.pruned_units(models.conv_units(model, params0), common.parse_list(c.layers.names))
    init = functools.partial(gst.init_run, model=model, sample_x=sample_x, tx=tx, units=units)
    target = jax.eval_shape(jax.vmap(init), jax.random.split(jax.random.key(0), len(recs)))
    target = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), target)
    out = gst.restore_runs(os.path.join(workdir, recs[0]["checkpoint"]), target, units)
    if out is None:
        raise ValueError(f"no checkpoint under {workdir}/{recs[0]['checkpoint']}")
    return out[1], recs


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    common.init_devices()  # multi-host runtime if configured; several devices -> seeds sharded
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", "workdirs/stability", "Output directory.")
    app.run(main)
