"""Pruning as noise injection (Bartoldson et al. 2020, Section 3.3, Fig. 5 / D2).

  python -m experiments.noise_injection --workdir=workdirs/noise_injection     # CPU default
  python -m experiments.noise_injection --config.conditions=none,prune,zero:1,restore:16
  python -m experiments.noise_injection --config.preset=cpu_overfit   # stability.py's overfit regime

Same model, data and Prune_L schedule (high rate, retrain period 4) as the CPU default of
`experiments/stability.py`. At every scheduled event the L-targeted filters are chosen as in
Prune_L; the conditions differ only in what happens to them:
  * `none`: no events (the no-pruning control);  `prune`: permanent Prune_L (mask kernel + BN);
  * `zero:N`: the newly targeted filters' kernels are zeroed before each of the next N training
    batches, then returned AT ZERO (they keep training from zero; BN scale/bias are left alone, else
    the channel would be a dead fixed point, see gst._perturb);
  * `restore:N`: every filter targeted so far is zeroed for N batches, then RESTORED bit for bit to
    its values from before the window, BN running mean and variance included (as the reference
    does; before stop 23 the statistics were not restored);
  * `gauss:N`: Gaussian noise with the std of the unperturbed filters' weights is added to the newly
    targeted kernels before each of N batches (it accumulates, as in the reference).
Windows count training batches only (one epoch = num_train // batch_size = 16 batches by default).
Expected runtime on 2 idle cores: about that of stability.py for the same number of runs (7 conditions x 8 seeds).

Writes to workdir: config.json, runs.jsonl/csv (per run: condition, seed, final and best test
accuracy), summary.jsonl/csv (per condition: mean and 95% t-interval; Welch t-tests against `none`
and `prune`), history.jsonl/csv, table.md, curves.png (mean test accuracy, bootstrap 95% bands),
final_acc.png, ckpt/ (orbax, final stacked states).
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

from experiments import common, gst, stability
from jaxprune import models, schedules, scoring, stats, train


def get_config() -> config_dict.ConfigDict:
    c = stability.get_config()  # data, model, layers, train: the stability CPU default
    del c.targets, c.periods, c.baseline  # preset: data/model/layers/train of a stability preset
    c.period = 4  # retrain period of the Prune_L schedule (the high iterative rate of stability.py)
    c.conditions = "none,prune,zero:1,zero:16,restore:16,gauss:1,gauss:16"  # see module docstring
    c.quick = False  # tests: digits, tiny CNN, 2 seeds, 4 epochs
    return c


def _quick(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    c = config_dict.ConfigDict(c.to_dict())
    if c.quick:
        q = stability._preset(config_dict.ConfigDict({**stability.get_config().to_dict(), "quick": True}))
        c.num_seeds, c.data, c.model, c.layers, c.train = q.num_seeds, q.data, q.model, q.layers, q.train
        c.period = 2
        c.conditions = "none,prune,zero:3,restore:3,gauss:3"
    elif c.preset != "cpu":
        base = stability.get_config()
        base.preset, base.num_seeds = c.preset, c.num_seeds
        q = stability._preset(base)
        c.data, c.model, c.layers, c.train = q.data, q.model, q.layers, q.train
    return c


def parse_condition(name: str) -> tuple[gst.RunSpec, bool]:
    """'none' | 'prune' | 'zero:N' | 'restore:N' | 'gauss:N' -> (RunSpec, has events)."""
    L = scoring.LARGEST
    if name == "none":
        return gst.make_spec(L, permanent=False), False
    if name == "prune":
        return gst.make_spec(L, permanent=True), True
    kind, _, n = name.partition(":")
    if kind not in ("zero", "restore", "gauss") or not n.isdigit() or int(n) < 1:
        raise ValueError(f"condition {name!r}: expected none, prune, zero:N, restore:N or gauss:N")
    noise = gst.NOISE_GAUSSIAN if kind == "gauss" else gst.NOISE_ZERO
    return gst.make_spec(L, permanent=False, noise=noise, restore=kind == "restore",
                         cumulative=kind == "restore", window=int(n)), True


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    c = _quick(config)
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
    table = schedules.count_table(gst.layer_schedules(c.layers, all_units, params0, c.period),
                                  c.train.epochs)
    conds = common.parse_list(c.conditions)
    parsed = [parse_condition(n) for n in conds]
    S = c.num_seeds
    keys = common.seed_streams(c.seed, S, ("init", "data", "prune"))
    rep = lambda k: jnp.concatenate([k] * len(conds))  # noqa: E731  paired seeds across conditions
    specs = gst.stack([spec for spec, _ in parsed for _ in range(S)])
    counts = np.stack([table if ev else np.zeros_like(table) for _, ev in parsed for _ in range(S)])
    init_fn = train.map_seeds(functools.partial(gst.init_run, model=model, sample_x=sample_x, tx=tx,
                                                units=units), (0,), strategy)
    states, hist = gst.train_runs(
        model=model, tx=tx, units=units, scoring_name=c.scoring, states=init_fn(rep(keys["init"])),
        specs=specs, counts=counts, ds=ds, data_keys=rep(keys["data"]), prune_keys=rep(keys["prune"]),
        batch_size=c.train.batch_size, eval_batch_size=c.train.eval_batch_size, strategy=strategy,
        noise=True, ckpt_dir=os.path.join(ckpt, "runs"), checkpoint_every=c.train.checkpoint_every,
        batch_shards=c.train.batch_shards,
        desc=f"noise injection ({len(conds)} conditions x {S} seeds)")
    del states
    last = schedules.last_pruning_epoch(table)
    recs = []
    for i in range(counts.shape[0]):
        g = scoring.generalization(hist["t_post"][i], hist["train_acc"][i], last)
        recs.append(dict(run=i, condition=conds[i // S], seed=i % S,
                         final_test=float(hist["t_post"][i, -1]), best_test=float(g.best_test),
                         gap=float(g.gap), checkpoint="ckpt/runs", index=i))
    common.write_records(workdir, "runs", recs)
    common.write_records(workdir, "history", [
        {"epoch": e + 1, **{k: hist[k][:, e] for k in ("t_pre", "t_post", "train_acc")}}
        for e in range(counts.shape[1])])
    summary = _summary(conds, recs)
    common.write_records(workdir, "summary", summary)
    _report(workdir, c, conds, S, hist, table, summary, ds.name, len(recs))
    return {"runs": recs, "summary": summary}


def _summary(conds: list[str], recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {n: [r for r in recs if r["condition"] == n] for n in conds}
    out = []
    for n in conds:
        row: dict[str, Any] = {"condition": n, "n": len(by[n])}
        for metric in ("final_test", "best_test"):
            ci = stats.mean_ci([r[metric] for r in by[n]])
            row.update({f"{metric}_mean": ci.mean, f"{metric}_ci_lo": ci.low, f"{metric}_ci_hi": ci.high})
            for ref in ("none", "prune"):
                if ref in by and ref != n and len(by[n]) >= 2:
                    a, b = [r[metric] for r in by[n]], [r[metric] for r in by[ref]]
                    if np.ptp(a + b) > 0:
                        t = stats.ttest(a, b)
                        row.update({f"{metric}_t_vs_{ref}": t.statistic, f"{metric}_p_vs_{ref}": t.pvalue})
        out.append(row)
    return out


def _report(workdir, c, conds, S, hist, table, summary, data_name, num_runs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ci(s, m):
        return common.fmt_ci({"mean": s[f"{m}_mean"], "ci_lo": s[f"{m}_ci_lo"], "ci_hi": s[f"{m}_ci_hi"]})

    rows = [{"condition": s["condition"], "n": s["n"], "final test %": ci(s, "final_test"),
             "p vs none (final)": s.get("final_test_p_vs_none", ""),
             "p vs prune (final)": s.get("final_test_p_vs_prune", ""),
             "best test % (>= last event)": ci(s, "best_test"),
             "p vs none (best)": s.get("best_test_p_vs_none", "")} for s in summary]
    text = (f"# Pruning as noise injection: {data_name}, {c.model.name}, Prune_L period {c.period}, "
            f"{len(conds)} conditions x {S} seeds = {num_runs} runs\n\n"
            "Mean and 95% t-interval over seeds; p = Welch two-sample t-test.\n\n"
            + common.markdown_table(rows, list(rows[0])))
    common.write_text(workdir, "table.md", text)

    epochs = np.arange(1, table.shape[0] + 1)
    fig, ax = plt.subplots(figsize=(8, 5))
    for j, n in enumerate(conds):
        curve = 100 * hist["t_post"][j * S:(j + 1) * S]
        b = stats.bootstrap_mean_ci(curve, seed=0)
        ax.plot(epochs, b.mean, color=f"C{j}", label=n)
        ax.fill_between(epochs, b.low, b.high, color=f"C{j}", alpha=0.15)
    for e in np.flatnonzero(schedules.pruning_epochs(table)):
        ax.axvline(e + 1, color="gray", lw=0.5, ls=":")
    ax.set_xlabel("epoch (dotted: Prune_L events)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "curves.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    m = np.array([100 * s["final_test_mean"] for s in summary])
    lo = np.array([100 * s["final_test_ci_lo"] for s in summary])
    hi = np.array([100 * s["final_test_ci_hi"] for s in summary])
    ok = np.isfinite(lo)
    ax.errorbar(np.arange(len(conds)), m, yerr=[np.where(ok, m - lo, 0), np.where(ok, hi - m, 0)],
                fmt="o", capsize=4)
    ax.set_xticks(np.arange(len(conds)), conds, rotation=30, fontsize=8)
    ax.set_ylabel("final test accuracy (%), 95% CI")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "final_acc.png"), dpi=120)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    common.init_devices()  # multi-host runtime if configured; several devices -> seeds sharded
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", "workdirs/noise_injection", "Output directory.")
    app.run(main)
