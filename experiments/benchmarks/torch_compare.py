"""jaxprune against PyTorch, same machine, same work: masked training steps, 1 and S seeds.

  python -m experiments.benchmarks.torch_compare                       # MLP + small CNN, S = 1,4,8
  python -m experiments.benchmarks.torch_compare --models=mlp --seeds=1,8,32 --optimizer=sgd
  python -m experiments.benchmarks.torch_compare --models=small_cnn --seeds=1,4 --cnn_steps=1

Needs PyTorch (benchmark only, not a jaxprune dependency): `pip install torch` (a CPU build does).
The work: one masked step of cross-entropy + Adam (or SGD with momentum 0.9) with a 50% random mask
on the kernels, masks multiplied into the weights; each seed has its own synthetic batch of
`batch_size` (MLP: LeNet-300-100 on 28x28x1; small CNN: conv 32-32-pool-64-64-pool, dense 128, dense
10 on 32x32x3, 3x3 SAME convs: the shapes of `jaxprune.models`). The torch models are rebuilt here
and start from the jax parameters and masks (converted to torch layouts), so both sides do the same
arithmetic: the header prints the largest loss difference after 3 steps as a check. Columns
(seed-steps per second, one Python call per step on every side):
  torch loop   PyTorch's usual loop over seeds: S modules masked with
               `torch.nn.utils.prune.custom_from_mask`, S `torch.optim` optimisers, eager;
  torch.func   `torch.func.vmap(grad_and_value(loss))` over stacked params (`functional_call` on
               m * w), one optimiser over the stacked tensors (Adam and SGD act elementwise);
  jax loop     `jax.jit(jaxprune.train.train_step)` (state donated) called for each seed;
  jax vmap     `train.map_seeds(train_step, ..., "vmap")`: one compiled S-seed program;
  jax seq      `train.map_seeds(train_step, ..., "sequential")`: slices, S calls, stacks.
Ratios: jax loop / torch loop, jax vmap / torch.func, best jax / best torch. torch gets
`torch.set_num_threads(os.cpu_count())` (printed; `--torch_threads` overrides it: on an
oversubscribed machine torch's OpenMP threads wait on each other and 1 thread can be several times
faster); XLA uses every core by default. Strategies are interleaved within each repeat so load
changes hit all alike; best of `repeats` is reported. Not a test: numbers depend on the machine
and its load (printed in the header). torch.compile is not used (eager PyTorch is the usual loop;
compiling needs a C++ toolchain and minutes per model on CPU).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from experiments.benchmarks import roofline
from jaxprune import models, train

PyTree = Any


def import_torch() -> Any:
    """torch, or an ImportError saying how to get it (it is a benchmark-only dependency)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "experiments.benchmarks.torch_compare needs PyTorch (jaxprune does not depend on it): "
            "install it into the venv with `.venv/bin/pip install torch` (the CPU build is enough)."
        ) from e
    return torch


def _torch_modules(torch: Any) -> dict[str, Callable[..., Any]]:
    nn, F = torch.nn, torch.nn.functional

    class TorchMLP(nn.Module):
        """relu(Linear) layers then a Linear head on the flattened input (jaxprune.models.MLP)."""

        def __init__(self, sizes: Sequence[int]):
            super().__init__()
            self.layers = nn.ModuleList(
                nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            )

        def forward(self, x):
            x = x.flatten(1)
            for layer in self.layers[:-1]:
                x = torch.relu(layer(x))
            return self.layers[-1](x)

    class TorchSmallCNN(nn.Module):
        """conv3x3-relu pairs, each pair then a 2x2 max-pool; dense-relu; head (jaxprune's)."""

        def __init__(self, c_in: int, channels: Sequence[int], flat: int, dense: int, classes: int):
            super().__init__()
            cs = [c_in, *channels]
            self.convs = nn.ModuleList(
                nn.Conv2d(a, b, 3, padding=1) for a, b in zip(cs[:-1], cs[1:], strict=True)
            )
            self.dense1 = nn.Linear(flat, dense)
            self.head = nn.Linear(dense, classes)

        def forward(self, x):
            for i, conv in enumerate(self.convs):
                x = torch.relu(conv(x))
                if i % 2 == 1:
                    x = F.max_pool2d(x, 2)
            return self.head(torch.relu(self.dense1(x.flatten(1))))

    return {"mlp": TorchMLP, "small_cnn": TorchSmallCNN}


def to_torch_layout(name: str, tree: PyTree, input_shape: Sequence[int]) -> dict[str, np.ndarray]:
    """A flax params (or mask) tree as a torch state dict: Dense (in, out) -> Linear (out, in), Conv
    HWIO -> OIHW, and the small CNN's first dense kernel re-ordered from NHWC to NCHW flattening."""
    t = jax.tree.map(np.asarray, tree)
    out: dict[str, np.ndarray] = {}
    if name == "mlp":
        dense = sorted((k for k in t if k.startswith("dense")), key=lambda s: int(s[5:]))
        for i, k in enumerate([*dense, "head"]):
            out[f"layers.{i}.weight"] = t[k]["kernel"].T
            out[f"layers.{i}.bias"] = t[k]["bias"]
        return out
    if name == "small_cnn":
        convs = sorted((k for k in t if k.startswith("conv")), key=lambda s: int(s[4:]))
        for i, k in enumerate(convs):
            out[f"convs.{i}.weight"] = t[k]["kernel"].transpose(3, 2, 0, 1)
            out[f"convs.{i}.bias"] = t[k]["bias"]
        h, w = (s // 2 ** (len(convs) // 2) for s in input_shape[:2])
        kern = t["dense1"]["kernel"]
        c = kern.shape[0] // (h * w)
        out["dense1.weight"] = (
            kern.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1).T
        )
        out["dense1.bias"] = t["dense1"]["bias"]
        out["head.weight"] = t["head"]["kernel"].T
        out["head.bias"] = t["head"]["bias"]
        return out
    raise ValueError(f"no torch replica of model {name!r}; choose mlp or small_cnn")


def _torch_module(torch: Any, name: str, model: Any, input_shape: Sequence[int]) -> Any:
    cls = _torch_modules(torch)[name]
    if name == "mlp":
        return cls([int(np.prod(input_shape)), *model.widths, model.num_classes])
    flat = (input_shape[0] // 4) * (input_shape[1] // 4) * model.channels[-1]
    return cls(input_shape[-1], model.channels, flat, model.dense, model.num_classes)


def _torch_optimizer(torch: Any, params: Any, cfg: train.TrainConfig) -> Any:
    if cfg.optimizer == "adam":  # optax.adam defaults: b1 0.9, b2 0.999, eps 1e-8 (same as torch)
        return torch.optim.Adam(params, lr=cfg.learning_rate)
    if cfg.optimizer == "sgd":  # optax trace: t = g + mu t (torch: dampening 0, no Nesterov)
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")


class Workload:
    """S seeds of one model on both frameworks, from the same params, masks and batches."""

    def __init__(
        self, name: str, num_seeds: int, batch: int, cfg: train.TrainConfig, **model_kwargs
    ):
        torch = self.torch = import_torch()
        self.name, self.s, self.cfg = name, num_seeds, cfg
        self.shape = roofline.INPUT_SHAPES[name]
        self.model = models.get_model(name, num_classes=10, **model_kwargs)
        self.tx = train.make_optimizer(cfg)
        x, y = roofline.synthetic_batch(self.shape, num_seeds * batch)
        self.x_S = x.reshape(num_seeds, batch, *self.shape)  # one batch per seed
        self.y_S = y.reshape(num_seeds, batch)
        self.states = roofline.masked_states(
            self.model, self.tx, x[:1], train.seed_keys(0, num_seeds)
        )
        # torch side: NCHW inputs, same values.
        self.xt_S = torch.from_numpy(np.array(self.x_S).transpose(0, 1, 4, 2, 3).copy())
        self.yt_S = torch.from_numpy(np.asarray(self.y_S).astype(np.int64))
        self.p_S = [
            to_torch_layout(name, jax.tree.map(lambda v, i=i: v[i], self.states.params), self.shape)
            for i in range(num_seeds)
        ]
        self.m_S = [
            to_torch_layout(name, jax.tree.map(lambda v, i=i: v[i], self.states.mask), self.shape)
            for i in range(num_seeds)
        ]

    # ------------------------------------------------------------------ torch
    def torch_loop(self) -> Callable[[int], list[float]]:
        """run(steps) -> seed-0 losses: S masked modules and optimisers, a loop over seeds."""
        torch = self.torch
        F = torch.nn.functional
        import torch.nn.utils.prune  # noqa: F401  (a submodule torch does not import by itself)

        mods, opts = [], []
        for p, m in zip(self.p_S, self.m_S, strict=True):
            mod = _torch_module(torch, self.name, self.model, self.shape)
            mod.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in p.items()})
            for mname, sub in mod.named_modules():
                if hasattr(sub, "weight") and isinstance(sub.weight, torch.nn.Parameter):
                    torch.nn.utils.prune.custom_from_mask(
                        sub, "weight", torch.from_numpy(np.array(m[f"{mname}.weight"]))
                    )
            mods.append(mod)
            opts.append(_torch_optimizer(torch, mod.parameters(), self.cfg))

        def run(steps: int) -> list[float]:
            losses = []
            for _ in range(steps):
                for i in range(self.s):
                    opts[i].zero_grad(set_to_none=True)
                    loss = F.cross_entropy(mods[i](self.xt_S[i]), self.yt_S[i])
                    loss.backward()
                    opts[i].step()
                    if i == 0:
                        losses.append(loss.detach())
            return [float(v) for v in losses]

        return run

    def torch_func(self) -> Callable[[int], list[float]]:
        """Returns run(steps) -> seed-0 losses: vmap(grad) over stacked params, one optimiser."""
        torch = self.torch
        F = torch.nn.functional
        from torch.func import functional_call, grad_and_value, vmap

        base = _torch_module(torch, self.name, self.model, self.shape).to("meta")
        params = {k: torch.from_numpy(np.stack([p[k] for p in self.p_S])) for k in self.p_S[0]}
        masks = {k: torch.from_numpy(np.stack([m[k] for m in self.m_S])) for k in self.m_S[0]}
        opt = _torch_optimizer(torch, list(params.values()), self.cfg)

        def loss_fn(p, m, x, y):
            return F.cross_entropy(functional_call(base, {k: p[k] * m[k] for k in p}, (x,)), y)

        grads_fn = vmap(grad_and_value(loss_fn))

        def run(steps: int) -> list[float]:
            losses = []
            for _ in range(steps):
                grads, loss = grads_fn(params, masks, self.xt_S, self.yt_S)
                for k, g in grads.items():
                    params[k].grad = g
                opt.step()
                losses.append(loss[0])
            return [float(v) for v in losses]

        return run

    # ------------------------------------------------------------------ jax
    def jax_fn(self, strategy: str) -> Callable[[int], list[float]]:
        """Returns run(steps) -> seed-0 losses for "loop" (one jitted single-seed step per seed)
        or a `train.map_seeds` strategy ("vmap", "sequential")."""
        step = functools.partial(train.train_step, model=self.model, tx=self.tx)
        if strategy == "loop":
            single = jax.jit(step, donate_argnums=0)
            states = [jax.tree.map(lambda v, i=i: v[i], self.states) for i in range(self.s)]
            xs = [self.x_S[i] for i in range(self.s)]
            ys = [self.y_S[i] for i in range(self.s)]

            def run(steps: int) -> list[float]:
                losses = []
                for _ in range(steps):
                    for i in range(self.s):
                        states[i], m = single(states[i], xs[i], ys[i])
                        if i == 0:
                            losses.append(m["loss"])
                jax.block_until_ready(states)
                return [float(v) for v in losses]

            return run
        fn = train.map_seeds(step, (0, 0, 0), strategy)
        box = [self.states]

        def run_mapped(steps: int) -> list[float]:
            losses = []
            for _ in range(steps):
                box[0], m = fn(box[0], self.x_S, self.y_S)
                losses.append(m["loss"][0])
            jax.block_until_ready(box[0])
            return [float(v) for v in losses]

        return run_mapped


IMPLS = ("torch loop", "torch.func", "jax loop", "jax vmap", "jax seq")


def check_same_work(
    name: str, batch: int, cfg: train.TrainConfig, steps: int = 3, **model_kwargs: Any
) -> dict[str, float]:
    """Largest |loss - loss of "jax loop"| over `steps` steps of one seed, by implementation."""
    w = Workload(name, 1, batch, cfg, **model_kwargs)
    runs = {
        "torch loop": w.torch_loop(),
        "torch.func": w.torch_func(),
        "jax loop": w.jax_fn("loop"),
        "jax vmap": w.jax_fn("vmap"),
    }
    losses = {k: np.asarray(f(steps)) for k, f in runs.items()}
    return {
        k: float(np.max(np.abs(v - losses["jax loop"])))
        for k, v in losses.items()
        if k != "jax loop"
    }


def bench(
    name: str,
    num_seeds: int,
    batch: int,
    steps: int,
    repeats: int,
    cfg: train.TrainConfig,
    impls: Sequence[str] = IMPLS,
    **model_kwargs: Any,
) -> dict[str, float]:
    """Seed-steps per second of each implementation, interleaved, best of `repeats`."""
    w = Workload(name, num_seeds, batch, cfg, **model_kwargs)
    makers = {
        "torch loop": w.torch_loop,
        "torch.func": w.torch_func,
        "jax loop": lambda: w.jax_fn("loop"),
        "jax vmap": lambda: w.jax_fn("vmap"),
        "jax seq": lambda: w.jax_fn("sequential"),
    }
    fns = {k: makers[k]() for k in impls}
    for f in fns.values():  # compile / warm up everything before timing anything
        f(1)
    best = {k: np.inf for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f(steps)
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: num_seeds * steps / v for k, v in best.items()}


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def run(
    model_names: Sequence[str] = ("mlp", "small_cnn"),
    seeds: Sequence[int] = (1, 4, 8),
    batch: int = 128,
    mlp_steps: int = 20,
    cnn_steps: int = 2,
    repeats: int = 3,
    optimizer: str = "adam",
    impls: Sequence[str] = IMPLS,
    torch_threads: int = 0,
    model_kwargs: dict[str, dict] | None = None,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Prints the table; returns one record per (model, S) with seed-steps/s per implementation.

    `torch_threads` 0 means os.cpu_count() (torch.set_num_threads)."""
    torch = import_torch()
    threads = torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    model_kwargs = model_kwargs or {}
    say = print if verbose else (lambda *a, **k: None)
    lr = 1e-3 if optimizer == "adam" else 0.05
    cfg = train.TrainConfig(optimizer=optimizer, learning_rate=lr, momentum=0.9, batch_size=batch)
    say(
        f"# torch vs jax, masked {optimizer} steps: {roofline.machine()}; "
        f"torch {torch.__version__}, "
        f"torch.set_num_threads({threads}) -> {torch.get_num_threads()} threads "
        f"({os.cpu_count()} cores); batch {batch}",
        flush=True,
    )
    for name in model_names:
        diffs = check_same_work(name, min(batch, 16), cfg, **model_kwargs.get(name, {}))
        say(
            f"# same-work check, {name}: max |loss - jax loss| over 3 steps: "
            + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()),
            flush=True,
        )
    cols = list(impls)
    say(
        "| model | S | steps/call | "
        + " | ".join(f"{c} (seed-steps/s)" for c in cols)
        + " | jax loop / torch loop | jax vmap / torch.func | best jax / best torch |"
    )
    say("|---|---|---|" + "---|" * (len(cols) + 3))
    records = []
    for name in model_names:
        steps = mlp_steps if name == "mlp" else cnn_steps
        for s in seeds:
            r = bench(name, s, batch, steps, repeats, cfg, impls, **model_kwargs.get(name, {}))
            best_jax = max((v for k, v in r.items() if k.startswith("jax")), default=None)
            best_torch = max((v for k, v in r.items() if k.startswith("torch")), default=None)
            say(
                f"| {name} | {s} | {steps} | "
                + " | ".join(f"{r[c]:.1f}" for c in cols)
                + f" | {_ratio(r.get('jax loop'), r.get('torch loop'))}"
                + f" | {_ratio(r.get('jax vmap'), r.get('torch.func'))}"
                + f" | {_ratio(best_jax, best_torch)} |",
                flush=True,
            )
            records.append({"model": name, "seeds": s, "steps": steps, **r})
    return records


def main(argv: Sequence[str]) -> None:
    del argv
    run(
        _MODELS.value,
        [int(s) for s in _SEEDS.value],
        _BATCH.value,
        _MLP_STEPS.value,
        _CNN_STEPS.value,
        _REPEATS.value,
        _OPTIMIZER.value,
        torch_threads=_THREADS.value,
    )


if __name__ == "__main__":
    from absl import app, flags

    _MODELS = flags.DEFINE_list("models", ["mlp", "small_cnn"], "mlp and/or small_cnn.")
    _SEEDS = flags.DEFINE_list("seeds", ["1", "4", "8"], "Numbers of seeds S.")
    _BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size per seed.")
    _MLP_STEPS = flags.DEFINE_integer("mlp_steps", 20, "MLP steps per timed call.")
    _CNN_STEPS = flags.DEFINE_integer("cnn_steps", 2, "Small-CNN steps per timed call.")
    _REPEATS = flags.DEFINE_integer(
        "repeats", 3, "Timed calls per configuration (best is reported)."
    )
    _OPTIMIZER = flags.DEFINE_enum("optimizer", "adam", ["adam", "sgd"], "Optimiser on both sides.")
    _THREADS = flags.DEFINE_integer(
        "torch_threads", 0, "torch.set_num_threads (0: os.cpu_count())."
    )
    app.run(main)
