"""Host-side plumbing shared by experiment modules: workdir files, tables, data + model from a config.

Nothing here is maths; the library (jaxprune/) never does I/O, experiments do it through these helpers.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from ml_collections import config_dict

from jaxprune import data as data_lib
from jaxprune import models, stats


CACHE_ENV = "JAXPRUNE_COMPILATION_CACHE"
CACHE_MAX_BYTES = 2 << 30  # least recently used programs are evicted past this


def compilation_cache_dir(env: Mapping[str, str] = os.environ) -> str | None:
    """Where compiled XLA programs are kept between runs: $JAXPRUNE_COMPILATION_CACHE ("off", "0"
    or "" disables it), else jax's own $JAX_COMPILATION_CACHE_DIR, else
    $XDG_CACHE_HOME/jaxprune/xla (default ~/.cache/jaxprune/xla)."""
    value = env.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none", "false") else value
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return env["JAX_COMPILATION_CACHE_DIR"]
    home = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "jaxprune", "xla")


def enable_compilation_cache(directory: str | None) -> None:
    """jax's persistent compilation cache in `directory` (None: off), for every program however
    quickly it compiled. A rerun of a study with the same shapes and flags then loads its programs
    instead of compiling them (the pft demo: 38.7 s cold, 23.2 s warm, identical results; README
    "Speed and scale"). The key covers the program, jax/XLA versions, XLA_FLAGS and devices, so a
    stale entry cannot be loaded. Call before the first compile."""
    if directory is None:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    share_cpu_cache_between_processes()
    try:
        import filelock  # noqa: F401  (jax needs it to bound the cache's size)
    except ImportError:
        return
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)


def host_cpu_signature() -> str:
    """The host CPU's model and instruction-set flags (Linux /proc/cpuinfo; else what `platform`
    knows): what XLA's CPU code generation depends on besides the program and versions."""
    import hashlib
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
        text = fields.get("model name", "") + "|" + fields.get("flags", fields.get("Features", ""))
    except OSError:
        text = ""
    text = f"{platform.machine()}|{platform.processor()}|{text}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def share_cpu_cache_between_processes() -> bool:
    """Lets every process of a CPU cluster load the programs process 0 cached.

    jax's key for a cached program includes the device assignment and a fingerprint of the
    backend's topology. Only process 0 writes entries, and on CPU both parts differ from process to
    process of one cluster (jax makes the key process-invariant only on GPUs), so on several CPU
    processes every other process compiled every program on every run: process 1 of the
    two-process pft demo spent 19 of its 48 s compiling 79 programs while process 0 waited for it
    in collectives. On several CPU processes the key here is built as jax builds it on GPUs (device
    assignment stripped; the executable is loaded onto the calling program's own devices) with the
    topology fingerprint replaced by the device kinds and the host CPU (`host_cpu_signature`, so a
    host with another CPU never loads it). Single-process and GPU keys are untouched. This
    replaces two private jax functions; returns False, changing nothing, when a jax version no
    longer has them (tests/launch_test.py then fails).
    """
    try:
        from jax._src import cache_key
        hash_config = cache_key._hash_accelerator_config
        hash_options = cache_key._hash_serialized_compile_options
        hash_string = cache_key._hash_string
    except (ImportError, AttributeError):
        return False
    if getattr(hash_config, "jaxprune", False):
        return True
    host = host_cpu_signature()

    def cpu_cluster() -> bool:
        return jax.process_count() > 1 and jax.default_backend() == "cpu"

    def hash_accelerator_config(hash_obj: Any, accelerators: np.ndarray) -> None:
        devices = list(accelerators.flat)
        if cpu_cluster() and all(d.platform == "cpu" for d in devices):
            hash_string(hash_obj, "jaxprune cpu " + host + " " + ",".join(d.device_kind for d in devices))
        else:
            hash_config(hash_obj, accelerators)

    def hash_compile_options(hash_obj: Any, options: Any, strip_device_assignment: bool = False) -> Any:
        return hash_options(hash_obj, options, strip_device_assignment=strip_device_assignment or cpu_cluster())

    hash_accelerator_config.jaxprune = True  # type: ignore[attr-defined]
    cache_key._hash_accelerator_config = hash_accelerator_config
    cache_key._hash_serialized_compile_options = hash_compile_options
    return True


def init_devices(verbose: bool = True) -> dict[str, Any]:
    """Starts JAX's multi-host runtime if the environment asks for it and the persistent
    compilation cache (`compilation_cache_dir`); returns the device layout.

    Call first in every experiment's `main`, before any JAX computation. It runs
    `jaxprune.sharding.initialize_from_env()` (JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES +
    JAX_PROCESS_ID, or SLURM / Open MPI with more than one task; nothing for one process), so the
    same command uses one device, all devices of a host, or all hosts: with several devices,
    seed_strategy="auto" resolves to "sharded" (seeds split over every device, jaxprune.sharding;
    "sharded_sequential" for conv nets on CPU devices, in one process or several).
    Safe to call twice. On several processes an uncaught exception ends the process at once
    (`fail_fast`).
    """
    from jaxprune import sharding

    cache = compilation_cache_dir()
    enable_compilation_cache(cache)
    started = jax.distributed.is_initialized() or sharding.initialize_from_env()
    if started and jax.process_count() > 1:
        fail_fast()
    info = {"distributed": bool(started), "process_index": jax.process_index(),
            "process_count": jax.process_count(), "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(), "platform": jax.default_backend()}
    if verbose:
        print(f"# devices: {info['device_count']} {info['platform']} "
              f"({info['local_device_count']} local), process {info['process_index']} of "
              f"{info['process_count']}; compilation cache: {cache or 'off'}", flush=True)
    return info


def fail_fast() -> None:
    """Makes an uncaught exception print its traceback and exit with status 1 at once.

    Without it a failing process of a multi-process run first waits in jax.distributed's shutdown
    barrier (300 s) for the others, which wait for it in their next collective: the failure
    surfaces five minutes later, as an abort of every process. Exiting at once lets a launcher
    (`experiments.launch`, `srun --kill-on-bad-exit`) see the real status and stop the rest.
    """
    if getattr(sys.excepthook, "jaxprune_fail_fast", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb) -> None:
        previous(exc_type, exc, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    hook.jaxprune_fail_fast = True
    sys.excepthook = hook


def setup_workdir(config: config_dict.ConfigDict, workdir: str) -> str:
    """Creates `workdir` and writes the resolved config as config.json."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; keep the progress bars readable
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
    return workdir


def parse_list(value: str | Sequence[Any], cast: type = str) -> list[Any]:
    """'a,b,c' (a flag-friendly string) or a sequence -> list of `cast` values."""
    if isinstance(value, str):
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    return [cast(v) for v in value]


def jsonable(v: Any) -> Any:
    """Arrays and numpy scalars as plain Python values (lists, floats, ints)."""
    if isinstance(v, (np.ndarray, jax.Array)):
        return np.asarray(v).tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def write_records(workdir: str, name: str, records: Iterable[Mapping[str, Any]]) -> None:
    """`name`.jsonl (one JSON object per record) and `name`.csv (lists stored as JSON strings)."""
    records = [{k: jsonable(v) for k, v in r.items()} for r in records]
    with open(os.path.join(workdir, f"{name}.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    keys: list[str] = []
    for r in records:
        keys.extend(k for k in r if k not in keys)
    with open(os.path.join(workdir, f"{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in records:
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_text(workdir: str, name: str, text: str) -> None:
    with open(os.path.join(workdir, name), "w") as f:
        f.write(text)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean and 95% t-interval over seeds (`jaxprune.stats.mean_ci`)."""
    ci = stats.mean_ci(np.asarray(values, np.float64))
    return {"mean": float(ci.mean), "ci_lo": float(ci.low), "ci_hi": float(ci.high)}


def fmt_ci(s: Mapping[str, float], scale: float = 100.0) -> str:
    """'12.34 ± 0.56' (half-width of the 95% interval), in percent by default."""
    half = (s["ci_hi"] - s["ci_lo"]) / 2
    return f"{scale * s['mean']:.2f} ± {scale * half:.2f}" if np.isfinite(half) else f"{scale * s['mean']:.2f}"


def load_data(c: config_dict.ConfigDict) -> data_lib.Dataset:
    """Dataset from a config block with fields name, data_dir, num_train, num_test, num_samples."""
    kwargs: dict[str, Any] = {}
    if c.name == "mnist1d" and c.get("num_samples"):
        kwargs["num_samples"] = int(c.num_samples)
    return data_lib.load_dataset(
        c.name,
        data_dir=c.get("data_dir") or None,
        num_train=c.get("num_train") or None,
        num_test=c.get("num_test") or None,
        **kwargs,
    )


def make_model(c: config_dict.ConfigDict, num_classes: int):
    """Model from a config block with a `name` and optional model kwargs in `kwargs`.

    A study's config carries the kwargs of its default model (the MLP's `widths`), which a locked
    config cannot delete; so kwargs the chosen model does not take are dropped with a warning that
    names them, and `--config.model.name=small_cnn` works on an MLP study.
    """
    kwargs = dict(c.get("kwargs", {}) or {})
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}

    def takes(key: str, value: Any) -> bool:  # flax modules are dataclasses: building one is free
        try:
            models.get_model(c.name, num_classes=num_classes, **{key: value})
        except TypeError:
            return False
        return True

    dropped = sorted(k for k, v in kwargs.items() if not takes(k, v))
    if dropped:
        given = ", ".join(f"{k}={kwargs[k]!r}" for k in dropped)
        warnings.warn(f"model {c.name!r} does not take {given} (another model's kwargs in the "
                      "config): ignored", stacklevel=2)
    return models.get_model(c.name, num_classes=num_classes,
                            **{k: v for k, v in kwargs.items() if k not in dropped})


def plot_lines(
    path: str,
    series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    hline: tuple[str, float] | None = None,
) -> None:
    """One line per series (x, mean, lo, hi) with a shaded 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (x, m, lo, hi) in series.items():
        ax.plot(x, m, marker="o", label=label)
        ax.fill_between(x, lo, hi, alpha=0.2)
    if hline is not None:
        ax.axhline(hline[1], color="k", ls="--", lw=1, label=hline[0])
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- shared pipeline


def seed_streams(seed: int, num_seeds: int, names: Sequence[str]) -> dict[str, jax.Array]:
    """Named key streams, each (S,): stream `name` of seed s is independent of every other stream."""
    from jaxprune import train

    keys = train.seed_keys(seed, num_seeds)
    split = jax.vmap(lambda k: jax.random.split(k, len(names)))(keys)
    return {n: split[:, i] for i, n in enumerate(names)}


def train_dense(model, model_name: str, cfg, ds: data_lib.Dataset, init_keys: jax.Array,
                run_keys: jax.Array, checkpoint_dir: str | None, desc: str = "dense"):
    """Initialises and trains S seeds of a dense model (resuming from `checkpoint_dir`)."""
    import functools

    from jaxprune import train

    tx = train.make_optimizer(cfg)
    strategy = train.resolve_strategy(cfg.seed_strategy, model_name)
    init_fn = train.map_seeds(
        functools.partial(train.init_state, model=model, sample_x=ds.train.x[:1], tx=tx), (0,), strategy
    )
    states = init_fn(init_keys)
    return train.fit(model, cfg, states, ds, run_keys, model_name=model_name,
                     checkpoint_dir=checkpoint_dir, desc=desc)


def baseline_masks(pruner: str, sparsity: float, model, model_name: str, strategy: str, states,
                   mask_keys: jax.Array, init_keys: jax.Array, ds: data_lib.Dataset, *,
                   snip_at: str = "init", snip_batch_size: int = 256, exclude_first_last: bool = False):
    """Per-seed baseline masks (S-stacked) for one pruner and sparsity.

    magnitude / random from the trained params; SNIP scores |g * w| on one batch of `snip_batch_size`
    training examples at initialisation (snip_at="init", the original SNIP) or at the trained params.
    """
    import functools

    import jax.numpy as jnp

    from jaxprune import masks, pruners, train

    if snip_at not in ("init", "trained"):
        raise ValueError(f"snip_at must be 'init' or 'trained', got {snip_at!r}")
    fn = pruners.get_pruner(pruner)
    params0 = jax.tree.map(lambda v: v[0], states.params)
    xb = jnp.asarray(ds.train.x[:snip_batch_size])
    yb = jnp.asarray(ds.train.y[:snip_batch_size])
    # Forward order comes from a fresh init (insertion order); stacked params have sorted keys.
    order = masks.leaf_paths_in_order(model.init(jax.random.key(0), xb[:1])["params"]) if exclude_first_last else None
    flags = masks.prunable_tree(params0, exclude_first_last=exclude_first_last, layer_order=order)

    def one(mask_key, init_key, params, batch_stats):
        if pruner == "snip" and snip_at == "init":
            params, batch_stats = train.init_variables(jax.random.split(init_key)[0], model, xb[:1])

        def loss_fn(p):
            return train.cross_entropy(train.forward(model, p, batch_stats, None, xb, train=False)[0], yb)

        return fn(mask_key, params, sparsity, flags, loss_fn=loss_fn)

    mapped = train.map_seeds(functools.partial(one), (0, 0, 0, 0), strategy)
    return mapped(mask_keys, init_keys, states.params, states.batch_stats), flags
