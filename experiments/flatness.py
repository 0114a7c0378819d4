"""Flatness of the generalization-stability checkpoints (Bartoldson et al. 2020, Sec. 3.4 / App. E).

  python -m experiments.flatness --workdir=workdirs/flatness \
      --config.stability_workdir=workdirs/stability           # defaults: sized for a GPU
  python -m experiments.flatness --workdir=workdirs/flatness_cpu \
      --config.stability_workdir=workdirs/stability_cpu --config.hutchinson.probes=6 ...  # README

Reads a finished `experiments.stability` workdir (config.json, runs.jsonl, ckpt/) and, for every
run, measures the flatness of its final network on the first `num_examples` TEST examples (the
paper: the first 512 CIFAR-10 test images), cross-entropy with BatchNorm in eval mode and the run's
pruning mask applied (the measures live on the kept coordinates, operator D H D; see
`jaxprune.flatness`):
  * Tr(H): Hutchinson (Rademacher probes, standard error), Hutch++, and the sum of the top-k
    eigenvalues by Lanczos and by deflated power iteration (the original's "Tr(H_100)", k = 100);
  * per-layer Tr(H) and Tr(H) over the PRUNED coordinates (loss without the mask at the masked
    weights: the curvature if pruned weights were let back in), from the same Hutchinson probes;
  * Tr(C), the per-example gradient second moment (uncentred, the original's) and covariance
    (centred); per layer and kept / pruned;
  * TIC: the original's proxy Tr(C) / Tr(H) (with Tr(H) = Hutchinson and = top-k sum) and
    Tr((H + damping I)^-1 C) by conjugate gradients on the first `tic.examples` examples;
  * epsilon-sharpness: smallest |eps| raising the loss by 0.1 along the top Lanczos eigenvectors
    (the paper: grid -0.40:0.01:0.40 along the top-10; here also refined by bisection).
Then correlates every measure with mean stability and with generalisation (best test accuracy, gap).

Runs are measured one after another with one compiled program per measure (on XLA CPU, vmapping
conv nets over runs was 3.5x slower, and HVPs inside `lax` loops ~3.4x slower than jitted calls from
Python; README "Flatness vs stability"). With several accelerators or hosts the runs are split over
the devices (`split_runs`): each device measures its runs with the same single-run programs, so
every row equals the one-device row; with several processes (`jax.distributed`, shared workdir)
each process measures its devices' runs and the rows are exchanged through the workdir. Runtime
of the README's CPU run (56 runs, reduced probes and iterations): 25 min wall under load average
5-9 on the shared 2 cores, ~6 min of it compilation. The defaults (100 probes, 40 Lanczos steps,
top-10, ...) are sized for a GPU.

Writes to workdir: config.json; measures.jsonl/csv (one row per run: the stability record plus
every measure); correlations.jsonl/csv and correlations.md (measure x {mean_stability, best_test,
gap} x {pruned runs, all runs}: Pearson r, p, Kendall tau, p, n); table.md (mean and 95%
t-interval of each measure per configuration; the numbers also in summary.jsonl/csv); timing.jsonl
(seconds per measure: first call incl. compile, median after; this process's calls only, and with
several local devices each device compiles on its first call); scatter_stability.png and
scatter_test.png (headline measures vs stability / test accuracy); spectrum.png (top Lanczos
eigenvalues per configuration).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.flatten_util import ravel_pytree
from ml_collections import config_dict, config_flags

from experiments import common, gst, stability
from jaxprune import flatness, masks, sharding, stats, train

PyTree = Any
MEASURES = ("hutchinson", "hutchpp", "lanczos", "power", "covariance", "tic", "sharpness")
TARGETS = ("mean_stability", "best_test", "gap")
# Headline measures: tables, plots, correlations.md. correlations.jsonl holds every numeric measure.
HEADLINE = ("trace_hutch", "trace_hutchpp", "trace_topk_lanczos", "trace_topk_power",
            "lambda_max_lanczos", "cov_trace", "cov_trace_centred", "tic_proxy", "tic_proxy_topk",
            "tic_trace", "eps_sharpness", "eps_sharpness_grid", "trace_pruned", "loss")


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.stability_workdir = "workdirs/stability"  # a finished experiments.stability run
    c.seed = 0
    c.num_examples = 512  # first test examples for every measure (paper: 512)
    c.runs = ""  # comma-separated run indices to measure; "" = all
    c.measures = ",".join(MEASURES)  # subset of MEASURES
    c.expensive_every = 1  # power and tic only on runs with index % expensive_every == 0
    c.top_k = 10  # eigenvalues summed into Tr(H_k) (paper: 100) and reported
    c.hutchinson = config_dict.create(probes=100, pruned_probes=10)  # kept / pruned-region probes
    c.hutchpp = config_dict.create(matvecs=99)  # 3 x (sketch size)
    c.lanczos = config_dict.create(iters=40)  # >= top_k; all Ritz values kept (lambda_min for TIC)
    # lax.fori_loop unroll: on XLA CPU rolled-loop HVPs of conv nets are ~3.4x slower; unrolling
    # trades that for compile time. 1 = rolled (GPU default); try iters on CPU.
    c.lanczos.unroll = 1
    c.power = config_dict.create(k=0, max_iters=20, tol=1e-4)  # k = 0: top_k; the original's steps
    c.covariance = config_dict.create(batch_size=8)  # per-example gradients vmapped in chunks
    # Tr((H + damping I)^-1 C), C from the first `examples` examples, one CG solve each; damping
    # must exceed -lambda_min (checked against Lanczos; runs where it does not get NaN).
    c.tic = config_dict.create(damping=5.0, examples=64, maxiter=50, tol=1e-4)
    # eps-sharpness along the top `directions` Lanczos eigenvectors, on the first `examples` test
    # examples (0 = all; the paper used the full test set), grid step..radius, then bisection.
    c.sharpness = config_dict.create(directions=10, threshold=0.1, radius=0.4, step=0.01,
                                     bisection_steps=10, examples=0)
    # Override the stability model's max-pool ("xla" / "reshape"; "" keeps it). Same function and
    # params; the reshape pool's second derivative divides by a tie count that is NaN under
    # jax_disable_most_optimizations (the tests' fast_compile), "xla" is safe there.
    c.pool_impl = ""
    # "all": runs split over every device of every process (run j of the list on device j mod d,
    # hosts interleaved; one thread per local device); "none": every run on this process's first
    # device; "auto": "all" on accelerators or several processes, "none" for the CPU devices of
    # one process (2 host devices on 2 cores: 0.68x, each measure slows down and compiles twice;
    # README).
    c.split_runs = "auto"
    c.quick = False  # tests: 64 examples, few probes and iterations
    return c


def _preset(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    c = config_dict.ConfigDict(c.to_dict())
    if c.quick:
        c.num_examples, c.top_k = 64, 2
        c.hutchinson.update(probes=6, pruned_probes=2)
        c.hutchpp.matvecs = 9
        c.lanczos.iters, c.power.k, c.power.max_iters = 6, 2, 5
        c.tic.update(examples=2, maxiter=6)
        c.expensive_every = 2
        c.sharpness.update(directions=2, radius=0.2, step=0.02, bisection_steps=4, examples=64)
        c.pool_impl = c.pool_impl or "xla"  # tests run under jax_disable_most_optimizations
    unknown = set(common.parse_list(c.measures)) - set(MEASURES)
    if unknown:
        raise ValueError(f"measures {sorted(unknown)} unknown; known: {MEASURES}")
    if c.split_runs not in ("auto", "all", "none"):
        raise ValueError(f"split_runs={c.split_runs!r}; expected 'auto', 'all' or 'none'")
    if not c.top_k <= c.lanczos.iters:
        raise ValueError(f"top_k={c.top_k} must be <= lanczos.iters={c.lanczos.iters}")
    if c.sharpness.directions > c.lanczos.iters:
        raise ValueError(f"sharpness.directions={c.sharpness.directions} > lanczos.iters")
    return c


# ----------------------------------------------------------------------------- per-run measures


def _loss(params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array, *, model) -> jax.Array:
    """Mean cross-entropy, BN in eval mode, WITHOUT the mask: callers pass masked weights w = m * w,
    where this loss equals the masked network's and its Hessian on kept coordinates is D H D."""
    logits, _ = train.forward(model, params, batch_stats, None, x, train=False)
    return train.cross_entropy(logits, y)


def _example_loss(params: PyTree, x: jax.Array, y: jax.Array, batch_stats: PyTree, *, model
                  ) -> jax.Array:
    return _loss(params, batch_stats, x[None], y[None], model=model)


class Measurer:
    """Jitted single-run measure functions, compiled once and reused for every run."""

    def __init__(self, c: config_dict.ConfigDict, model):
        loss = functools.partial(_loss, model=model)
        ex_loss = functools.partial(_example_loss, model=model)
        k = c.top_k

        def hutch(key, p, bs, m, x, y, groups):
            return flatness.hutchinson_block_traces(key, lambda q: loss(q, bs, x, y), p, m, c.hutchinson.probes,
                                c.hutchinson.pruned_probes, groups)

        def hutchpp(key, p, bs, m, x, y):
            return flatness.hutchpp_trace(key, lambda q: loss(q, bs, x, y), p, c.hutchpp.matvecs, m)

        def lanczos(key, p, bs, m, x, y):
            # k = iters keeps every Ritz value: the smallest estimates lambda_min (TIC damping).
            e = flatness.lanczos_eigenpairs(key, lambda q: loss(q, bs, x, y), p, c.lanczos.iters,
                                            c.lanczos.iters, m, unroll=c.lanczos.unroll)
            dirs = jax.tree.map(lambda v: v[: max(c.sharpness.directions, 1)], e.eigenvectors)
            return e.eigenvalues, dirs

        def power(key, p, bs, m, x, y):
            return flatness.power_iteration_eigenpairs(
                key, lambda q: loss(q, bs, x, y), p, c.power.k or k, c.power.max_iters, c.power.tol,
                m).eigenvalues

        def covariance(key, p, bs, m, x, y):
            mom = flatness.gradient_moments(lambda q, xi, yi: ex_loss(q, xi, yi, bs), p, x, y,
                                            batch_size=c.covariance.batch_size)
            cov = lambda _, mm: flatness.covariance_trace(mom, mm)  # noqa: E731
            kp_key, layer_key = jax.random.split(key)
            return (flatness.by_region(cov, kp_key, flatness.kept_pruned_masks(m)),
                    flatness.by_region(cov, layer_key, flatness.layer_masks(p, m)))

        def tic(p, bs, m, x, y):
            n = c.tic.examples
            return flatness.tic_trace(lambda q: loss(q, bs, x, y),
                                      lambda q, xi, yi: ex_loss(q, xi, yi, bs), p, x[:n], y[:n],
                                      c.tic.damping, m, batch_size=1, tol=c.tic.tol,
                                      maxiter=c.tic.maxiter)

        def sharpness(p, bs, x, y, dirs):
            return flatness.epsilon_sharpness(
                lambda q: loss(q, bs, x, y), p, dirs, c.sharpness.threshold, c.sharpness.radius,
                c.sharpness.step, c.sharpness.bisection_steps)

        def base(p, bs, x, y):
            logits, _ = train.forward(model, p, bs, None, x, train=False)
            return train.cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)

        self.fns = {n: jax.jit(f) for n, f in dict(
            base=base, hutchinson=hutch, hutchpp=hutchpp, lanczos=lanczos, power=power,
            covariance=covariance, tic=tic, sharpness=sharpness).items()}
        self.times: dict[str, list[float]] = {n: [] for n in self.fns}

    def __call__(self, name: str, *args: Any) -> Any:
        start = time.perf_counter()
        out = jax.block_until_ready(self.fns[name](*args))
        self.times[name].append(time.perf_counter() - start)
        return out


def measure_run(fn: Measurer, c: config_dict.ConfigDict, key: jax.Array, state: train.TrainState,
                data: dict[str, jax.Array], index: int) -> dict[str, Any]:
    """Every selected measure of one run (`state` unstacked) as a flat dict of floats / lists."""
    todo = set(common.parse_list(c.measures))
    expensive = index % c.expensive_every == 0
    keys = dict(zip(MEASURES, jax.random.split(key, len(MEASURES))))
    m = state.mask
    p = masks.apply(state.params, m)  # w = m * w (stored weights already are; make it certain)
    bs, x, y = state.batch_stats, data["x"], data["y"]
    nan = float("nan")
    row: dict[str, Any] = {}
    loss, acc = fn("base", p, bs, x, y)
    row.update(loss=float(loss), accuracy=float(acc), num_kept=int(ravel_pytree(m)[0].sum()))
    if "hutchinson" in todo:
        names, groups = flatness.layer_group_rows(p, m)
        h = fn("hutchinson", keys["hutchinson"], p, bs, m, x, y, jnp.asarray(groups, x.dtype))
        row.update(trace_hutch=float(h["trace"]), trace_hutch_se=float(h["trace_se"]),
                   trace_pruned=float(h.get("pruned", nan)),
                   trace_pruned_se=float(h.get("pruned_se", nan)))
        row.update({f"trace_layer_{n}": float(v) for n, v in zip(names, h["layers"])})
        row.update({f"trace_layer_{n}_se": float(v) for n, v in zip(names, h["layers_se"])})
    if "hutchpp" in todo:
        e = fn("hutchpp", keys["hutchpp"], p, bs, m, x, y)
        row.update(trace_hutchpp=float(e.estimate), trace_hutchpp_se=float(e.stderr))
    dirs, lam_min = None, nan
    if {"lanczos", "sharpness"} & todo or ("tic" in todo and expensive):
        ev, dirs = fn("lanczos", keys["lanczos"], p, bs, m, x, y)
        ev = np.asarray(ev, np.float64)
        lam_min = float(ev[-1])
        row.update(lanczos_top=ev[: c.top_k].tolist(), lambda_max_lanczos=float(ev[0]),
                   lambda_min_lanczos=lam_min, trace_topk_lanczos=float(ev[: c.top_k].sum()))
    if "power" in todo:
        top = np.asarray(fn("power", keys["power"], p, bs, m, x, y)) if expensive else None
        row.update(power_top=None if top is None else top.tolist(),
                   lambda_max_power=nan if top is None else float(top[0]),
                   trace_topk_power=nan if top is None else float(top.sum()))
    if "covariance" in todo:
        kp, layers = fn("covariance", keys["covariance"], p, bs, m, x, y)
        row.update(cov_trace=float(kp["kept"].uncentred),
                   cov_trace_centred=float(kp["kept"].centred),
                   cov_pruned=float(kp["pruned"].uncentred))
        row.update({f"cov_layer_{n}": float(v.uncentred) for n, v in layers.items()})
        if "trace_hutch" in row:
            row["tic_proxy"] = float(flatness.tic_proxy(row["cov_trace"], row["trace_hutch"]))
        if "trace_topk_lanczos" in row:  # the original: Tr(C) / sum of the top-k eigenvalues
            row["tic_proxy_topk"] = float(flatness.tic_proxy(row["cov_trace"],
                                                             row["trace_topk_lanczos"]))
    if "tic" in todo:
        ok = expensive and lam_min + c.tic.damping > 0  # CG needs H + damping I > 0
        row.update(tic_damping=c.tic.damping,
                   tic_trace=float(fn("tic", p, bs, m, x, y)) if ok else nan)
    if "sharpness" in todo:
        n = c.sharpness.examples or data["x_all"].shape[0]
        k = c.sharpness.directions
        sd = jax.tree.map(lambda v: v[:k], dirs)
        s = fn("sharpness", p, bs, data["x_all"][:n], data["y_all"][:n], sd)
        inc, radii = np.asarray(s.loss_increase), np.asarray(s.radii)
        crossed = inc >= c.sharpness.threshold
        grid = np.where(crossed.any(-1), radii[np.argmax(crossed, -1)], np.inf).min()
        row.update(eps_sharpness=float(s.epsilon), eps_sharpness_grid=float(grid))
    return row


# ----------------------------------------------------------------------------- the study


def assign_runs(idx: list[int]) -> dict[jax.Device, list[int]]:
    """This process's devices and their runs: run idx[j] goes to device j mod d of all d devices,
    hosts interleaved (`sharding.seed_mesh`), so every process computes the same assignment."""
    devices = list(sharding.seed_mesh().devices[:, 0])
    work: dict[jax.Device, list[int]] = {}
    for j, i in enumerate(idx):
        d = devices[j % len(devices)]
        if d.process_index == jax.process_index():
            work.setdefault(d, []).append(i)
    return work


def _split(mode: str) -> bool:
    if mode == "auto":
        return jax.process_count() > 1 or jax.default_backend() != "cpu"
    return mode == "all"


def _exchange_rows(workdir: str, rows: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Every process's rows, on every process, through files in the (shared) workdir."""
    from jax.experimental import multihost_utils

    parts = os.path.join(workdir, "parts")
    os.makedirs(parts, exist_ok=True)
    with open(os.path.join(parts, f"measures_{jax.process_index()}.json"), "w") as f:
        json.dump({str(i): {k: common.jsonable(v) for k, v in r.items()} for i, r in rows.items()}, f)
    multihost_utils.sync_global_devices("flatness rows written")
    out: dict[int, dict[str, Any]] = {}
    for p in range(jax.process_count()):
        with open(os.path.join(parts, f"measures_{p}.json")) as f:
            out.update({int(i): r for i, r in json.load(f).items()})
    multihost_utils.sync_global_devices("flatness rows read")
    return out


def _check_stability(wd: str) -> None:
    missing = [f for f in ("config.json", "runs.jsonl") if not os.path.exists(os.path.join(wd, f))]
    if missing:
        raise ValueError(f"no finished stability study in {wd!r} (missing {missing}): run "
                         f"`python -m experiments.stability --workdir={wd}` first, or set "
                         "--config.stability_workdir")


def _load_stability(c: config_dict.ConfigDict):
    wd = c.stability_workdir
    with open(os.path.join(wd, "config.json")) as f:
        sc = stability._preset(config_dict.ConfigDict(json.load(f)))
    states, recs = stability.load_states(sc, wd)
    ds = gst.load_data(sc.data)
    mc = config_dict.ConfigDict(sc.model.to_dict())
    if c.pool_impl:
        mc.kwargs.pool_impl = c.pool_impl
    return sc, states, recs, ds, common.make_model(mc, ds.num_classes)


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    """Measures every selected run of the stability study; writes the files in the docstring."""
    from tqdm.auto import tqdm

    c = _preset(config)
    _check_stability(c.stability_workdir)
    common.setup_workdir(c, workdir)  # (also quiets orbax's INFO logs before the restore)
    sc, states, recs, ds, model = _load_stability(c)
    n_test = ds.test.x.shape[0]
    if not 2 <= c.num_examples <= n_test:
        raise ValueError(f"num_examples={c.num_examples} must lie in [2, {n_test}] (test set size)")
    if "tic" in common.parse_list(c.measures) and not 1 <= c.tic.examples <= c.num_examples:
        raise ValueError(f"tic.examples={c.tic.examples} must lie in [1, num_examples]")
    xt, yt = jnp.asarray(ds.test.x), jnp.asarray(ds.test.y)
    data = dict(x=xt[: c.num_examples], y=yt[: c.num_examples], x_all=xt, y_all=yt)
    idx = common.parse_list(c.runs, int) if c.runs else list(range(len(recs)))
    if not idx or not all(0 <= i < len(recs) for i in idx):
        raise ValueError(f"runs={c.runs!r}: indices must lie in [0, {len(recs)})")
    fn = Measurer(c, model)
    base_key = jax.random.key(c.seed)
    # "none" with several processes: each measures every run on its own first device (jax.devices()
    # starts with process 0's, which no other process can address).
    work = assign_runs(idx) if _split(c.split_runs) else {jax.local_devices()[0]: list(idx)}
    bar = tqdm(total=sum(map(len, work.values())),
               desc=f"flatness ({len(idx)} runs, {len(work)} local devices)")
    done: dict[int, dict[str, Any]] = {}
    placement: dict[int, int] = {}  # run -> id of the device that measured it (this process)

    def measure_on(device: jax.Device, runs: list[int]) -> None:
        put = functools.partial(jax.device_put, device=device)  # inputs committed: jit runs there
        data_d = put(data)
        for i in runs:
            state = put(jax.tree.map(lambda v, i=i: v[i], states.train))
            meta = {k: v for k, v in recs[i].items() if k not in ("checkpoint",)}
            done[i] = {**meta, **measure_run(fn, c, put(jax.random.fold_in(base_key, i)), state,
                                             data_d, i)}
            placement[i] = device.id
            bar.update()

    if len(work) <= 1:  # (a process gets no run when there are fewer runs than devices)
        for device, runs in work.items():
            measure_on(device, runs)
    else:  # one thread per device: dispatch releases the GIL, so the devices run concurrently
        with concurrent.futures.ThreadPoolExecutor(len(work)) as pool:
            for f in [pool.submit(measure_on, d, r) for d, r in work.items()]:
                f.result()
    bar.close()
    if jax.process_count() > 1:
        done = _exchange_rows(workdir, done)
    rows = [done[i] for i in idx]
    common.write_records(workdir, "measures", rows)
    timing = [dict(measure=n, calls=len(t), first_s=t[0], median_s=float(np.median(t[1:] or t)),
                   total_s=float(np.sum(t))) for n, t in fn.times.items() if t]
    common.write_records(workdir, "timing", timing)
    corr = correlations(rows)
    common.write_records(workdir, "correlations", corr)
    summary = _report(workdir, c, sc, rows, corr, ds.name)
    return {"measures": rows, "correlations": corr, "summary": summary, "timing": timing,
            "placement": placement}


def _numeric_measures(rows: list[dict[str, Any]]) -> list[str]:
    skip = set(TARGETS) | {"run", "index", "seed", "period", "rate", "best_epoch", "train_at_best",
                           "final_test", "num_events", "tic_damping"}
    keys = [k for k in rows[0] if k not in skip and not k.startswith("kept_")
            and not k.endswith("_se") and isinstance(rows[0][k], (int, float))]
    return keys


def correlations(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pearson / Kendall of every numeric measure with each target, over pruned runs and all runs
    (non-finite values dropped; pairs with < 3 points or a constant side skipped)."""
    out = []
    groups = [("pruned runs", [r for r in rows if r["period"] > 0]), ("all runs", rows)]
    for measure in _numeric_measures(rows):
        for target in TARGETS:
            for label, rs in groups:
                xy = np.array([(r[measure], r[target]) for r in rs], np.float64).reshape(-1, 2)
                xy = xy[np.isfinite(xy).all(1)]
                if len(xy) < 3 or np.ptp(xy[:, 0]) == 0 or np.ptp(xy[:, 1]) == 0:
                    continue
                with np.errstate(divide="ignore"):  # |r| = 1 on few points: infinite Fisher z
                    p, k = stats.pearson(xy[:, 0], xy[:, 1]), stats.kendall(xy[:, 0], xy[:, 1])
                out.append(dict(measure=measure, target=target, group=label, n=p.n,
                                pearson_r=p.stat, pearson_p=p.pvalue, kendall_tau=k.stat,
                                kendall_p=k.pvalue))
    return out


def _report(workdir: str, c, sc, rows, corr, data_name: str) -> list[dict[str, Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    head = [m for m in HEADLINE if m in rows[0]]
    summary, table = [], []
    for m in ("mean_stability", "best_test", "gap") + tuple(head):
        line = {"measure": m}
        for cf in configs:
            v = np.array([r[m] for r in rows if r["config"] == cf], np.float64)
            v = v[np.isfinite(v)]
            if len(v) == 0:
                line[cf] = ""
                continue
            s = common.summarize(v) if len(v) > 1 else dict(mean=v[0], ci_lo=np.nan, ci_hi=np.nan)
            summary.append(dict(measure=m, config=cf, n=len(v), **s))
            half = (s["ci_hi"] - s["ci_lo"]) / 2
            line[cf] = (f"{s['mean']:.4g} ± {half:.2g}" if np.isfinite(half)
                        else f"{s['mean']:.4g}")
        table.append(line)
    common.write_records(workdir, "summary", summary)
    n_runs = {cf: sum(r["config"] == cf for r in rows) for cf in configs}
    text = (f"# Flatness of the stability runs: {data_name}, {sc.model.name}, {len(rows)} runs\n\n"
            f"First {c.num_examples} test examples, BN eval mode, masks applied; mean ± half-width "
            "of the 95% t-interval over seeds (runs per config: "
            + ", ".join(f"{k} {v}" for k, v in n_runs.items()) + "). Stability in %, accuracy and "
            "gap as fractions. Tr(H_k) sums the top "
            f"{c.top_k} eigenvalues; eps* is the smallest |eps| raising the loss by "
            f"{c.sharpness.threshold} along the top {c.sharpness.directions} eigenvectors. "
            "Non-finite values (eps* = inf: the loss never rose by the threshold; measures skipped "
            "on some runs) are left out of the means.\n\n"
            + common.markdown_table(table, ["measure"] + configs))
    common.write_text(workdir, "table.md", text)

    crow = [dict(measure=r["measure"], target=r["target"], group=r["group"], n=r["n"],
                 r=f"{r['pearson_r']:+.3f}", p=f"{r['pearson_p']:.2g}",
                 tau=f"{r['kendall_tau']:+.3f}", p_tau=f"{r['kendall_p']:.2g}")
            for r in corr if r["measure"] in head]
    text = ("# Flatness vs stability and generalisation\n\nPearson r and Kendall tau (two-sided "
            "p-values) over one point per run. Paper (Section 3.4, VGG11, no numbers in the text): "
            "stability is negatively correlated with flatness, i.e. POSITIVELY with Tr(H), Tr(C) "
            "and TIC, and negatively with eps*.\n\n"
            + common.markdown_table(crow, ["measure", "target", "group", "n", "r", "p", "tau",
                                           "p_tau"]))
    common.write_text(workdir, "correlations.md", text)

    plot = [m for m in ("trace_hutch", "trace_topk_lanczos", "lambda_max_lanczos", "cov_trace",
                        "tic_proxy", "tic_trace", "eps_sharpness", "trace_topk_power") if m in head]
    by = {(r["measure"], r["target"]): r for r in corr if r["group"] == "pruned runs"}
    for target, fname, label in (("mean_stability", "scatter_stability.png", "mean stability (%)"),
                                 ("best_test", "scatter_test.png", "best test accuracy")):
        if not plot:
            break
        ncol = min(4, len(plot))
        fig, axes = plt.subplots((len(plot) + ncol - 1) // ncol, ncol, squeeze=False,
                                 figsize=(3.6 * ncol, 3.0 * ((len(plot) + ncol - 1) // ncol)))
        for ax, m in zip(axes.ravel(), plot):
            for j, cf in enumerate(configs):
                rs = [r for r in rows if r["config"] == cf]
                ax.scatter([r[target] for r in rs], [r[m] for r in rs], s=12, color=f"C{j}",
                           label=cf)
            cr = by.get((m, target))
            ax.set_title(m + (f"\npruned: r={cr['pearson_r']:.2f} (p={cr['pearson_p']:.2g}), "
                              f"tau={cr['kendall_tau']:.2f}" if cr else ""), fontsize=8)
            ax.set_xlabel(label, fontsize=8)
            ax.grid(alpha=0.3)
        for ax in axes.ravel()[len(plot):]:
            ax.axis("off")
        axes.ravel()[0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, fname), dpi=110)
        plt.close(fig)

    if "lanczos_top" in rows[0]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for j, cf in enumerate(configs):
            top = np.array([r["lanczos_top"] for r in rows if r["config"] == cf])
            ax.plot(np.arange(1, top.shape[1] + 1), top.mean(0), marker="o", color=f"C{j}",
                    label=cf)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xticks(np.arange(1, len(rows[0]["lanczos_top"]) + 1))
        ax.set_xlabel("eigenvalue index (Lanczos Ritz values)")
        ax.set_ylabel("mean eigenvalue over seeds")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, "spectrum.png"), dpi=110)
        plt.close(fig)
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    common.init_devices()  # multi-host runtime if configured; several devices -> runs split
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", "workdirs/flatness", "Output directory.")
    app.run(main)
