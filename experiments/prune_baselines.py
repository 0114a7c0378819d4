"""Baseline pruning: train dense (S seeds at once), prune with each baseline, optionally fine-tune.

  python -m experiments.prune_baselines --workdir=workdirs/prune_baselines        # mnist1d MLP, ~1 min CPU
  python -m experiments.prune_baselines --config.pruners=magnitude,snip --config.sparsities=0.9,0.98
  python -m experiments.prune_baselines --config.data.name=fashion_mnist --config.model.name=small_cnn

Writes to workdir: config.json, dense.jsonl/csv (per-epoch dense training), results.jsonl/csv (one row
per pruner x sparsity x stage with per-seed test errors, mean and 95% CI), table.md, errors.png,
checkpoints under ckpt/.
"""

from __future__ import annotations

import os
from typing import Any

from absl import app, flags
from ml_collections import config_dict, config_flags

from experiments import common
from jaxprune import masks, train


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.seed = 0
    c.num_seeds = 4  # leading axis S of every result array
    c.data = config_dict.create(name="mnist1d", data_dir="", num_train=0, num_test=0, num_samples=5000)
    c.model = config_dict.create(name="mlp", kwargs=config_dict.create(widths=(256, 128)))
    c.train = config_dict.create(  # dense training; fields of jaxprune.train.TrainConfig
        optimizer="adam", learning_rate=1e-3, momentum=0.9, weight_decay=0.0, batch_size=128, epochs=30,
        # eval batch 250: conv nets on CPU evaluate 1.5-2.8x faster than at 1000 (README, "Second
        # machine"); the MLP is indifferent.
        steps_per_epoch=0, eval_batch_size=250, seed_strategy="auto", checkpoint_every=5,
        batch_shards=1)  # "sharded" only: each seed's batch split over this many devices
    c.pruners = "magnitude,magnitude_layer,snip,random,random_erk"  # names in jaxprune.pruners.PRUNERS
    c.sparsities = "0.5,0.8,0.9,0.95,0.98"
    c.finetune_epochs = 5  # 0: no fine-tuning
    c.finetune_lr = 1e-3
    c.snip_at = "init"  # "init" (original SNIP) or "trained"
    c.exclude_first_last = False
    c.quick = False  # tests: tiny data, 2 seeds, 1 epoch
    return c


def _quick(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    c = config_dict.ConfigDict(c.to_dict())
    c.num_seeds = 2
    c.data = config_dict.create(name="digits", data_dir="", num_train=0, num_test=0, num_samples=0)
    c.model.kwargs.widths = (32,)
    c.train.epochs = 3
    c.train.batch_size = 64
    c.pruners = "magnitude,snip,random"
    c.sparsities = "0.5,0.9"
    c.finetune_epochs = 1
    return c


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the study; returns {"dense": summary, "results": rows}."""
    c = _quick(config) if config.quick else config
    common.setup_workdir(c, workdir)
    ds = common.load_data(c.data)
    model = common.make_model(c.model, ds.num_classes)
    cfg = train.TrainConfig.from_dict(c.train)
    strategy = train.resolve_strategy(cfg.seed_strategy, c.model.name)
    keys = common.seed_streams(c.seed, c.num_seeds, ("init", "data", "mask", "finetune"))
    ckpt = os.path.join(workdir, "ckpt")

    states, hist = common.train_dense(model, c.model.name, cfg, ds, keys["init"], keys["data"],
                                      os.path.join(ckpt, "dense"))
    common.write_records(workdir, "dense", hist)
    dense = common.summarize(hist[-1]["test_error"])
    rows: list[dict[str, Any]] = []
    ft_cfg = train.TrainConfig(**{**cfg.__dict__, "epochs": c.finetune_epochs, "learning_rate": c.finetune_lr})
    tx = train.make_optimizer(ft_cfg)
    eval_fn = train.map_seeds(lambda s, x, y: train.evaluate(s, x, y, model=model, batch_size=cfg.eval_batch_size),
                              (0, None, None), strategy)
    start_fn = train.map_seeds(lambda k, p, bs, m: train.state_from_params(k, p, bs, tx, m), (0, 0, 0, 0), strategy)
    for pruner in common.parse_list(c.pruners):
        for sp in common.parse_list(c.sparsities, float):
            mask, flags_ = common.baseline_masks(
                pruner, sp, model, c.model.name, strategy, states, keys["mask"], keys["init"], ds,
                snip_at=c.snip_at, exclude_first_last=c.exclude_first_last)
            pruned = start_fn(keys["finetune"], states.params, states.batch_stats, mask)
            achieved = float(masks.sparsity(jax_first(mask), flags_))
            ev = eval_fn(pruned, ds.test.x, ds.test.y)
            rows.append(_row(pruner, sp, achieved, "pruned", ev["error"]))
            if c.finetune_epochs:
                tuned, _ = train.fit(model, ft_cfg, pruned, ds, keys["finetune"], model_name=c.model.name,
                                     checkpoint_dir=os.path.join(ckpt, f"ft_{pruner}_{sp}"),
                                     desc=f"finetune {pruner} {sp}")
                rows.append(_row(pruner, sp, achieved, "finetuned", eval_fn(tuned, ds.test.x, ds.test.y)["error"]))
    common.write_records(workdir, "results", rows)
    _report(workdir, c, dense, rows)
    return {"dense": dense, "results": rows}


def jax_first(tree):
    import jax

    return jax.tree.map(lambda v: v[0], tree)


def _row(pruner: str, sp: float, achieved: float, stage: str, errors) -> dict[str, Any]:
    import numpy as np

    errs = np.asarray(errors, np.float64).tolist()
    return {"pruner": pruner, "sparsity": sp, "achieved_sparsity": achieved, "stage": stage,
            "test_error": errs, **common.summarize(errs)}


def _report(workdir: str, c, dense: dict[str, float], rows: list[dict[str, Any]]) -> None:
    table = [{"pruner": r["pruner"], "sparsity": r["sparsity"], "stage": r["stage"],
              "test error % (95% CI)": common.fmt_ci(r)} for r in rows]
    text = (f"# Baseline pruning: {c.data.name}, {c.model.name}, {c.num_seeds} seeds\n\n"
            f"Dense test error: {common.fmt_ci(dense)} %\n\n"
            + common.markdown_table(table, ["pruner", "sparsity", "stage", "test error % (95% CI)"]))
    common.write_text(workdir, "table.md", text)
    series = {}
    for r in rows:
        x, m, lo, hi = series.setdefault(f"{r['pruner']} ({r['stage']})", ([], [], [], []))
        x.append(r["sparsity"]); m.append(100 * r["mean"]); lo.append(100 * r["ci_lo"]); hi.append(100 * r["ci_hi"])
    common.plot_lines(os.path.join(workdir, "errors.png"), series, xlabel="sparsity", ylabel="test error (%)",
                      title=f"{c.data.name} / {c.model.name}: mean and 95% CI over {c.num_seeds} seeds",
                      hline=("dense", 100 * dense["mean"]))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    common.init_devices()  # multi-host runtime if configured; several devices -> seeds sharded
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", "workdirs/prune_baselines", "Output directory.")
    app.run(main)
