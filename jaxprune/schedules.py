"""Pruning schedules: per-layer iterative filter schedules and the polynomial sparsity schedule.

Iterative structured schedule (Bartoldson et al. 2020, notes §1.2): a layer with N filters, total
pruning fraction f and pruning epochs `range(start, end + 1, period)` (n events, 0-based) keeps

    final_kept     = ceil((1 - f) N)
    current_kept_i = ceil(final_kept + (N - final_kept) (n - i) / n),   i = 1..n

filters after event i, so event i prunes k_i = current_kept_{i-1} - current_kept_i, with
current_kept_0 = N. The host-side functions reproduce the authors' Python float arithmetic exactly
(f = 0.7, N = 10 gives final_kept = ceil(3.0000000000000004) = 4, as in their code). `count_table`
turns a list of layer schedules into an (epochs, layers) int32 array that a compiled training loop
indexes with the epoch; stacking the tables of several periods gives an array over which a rate
sweep can be vmapped.

Polynomial schedule (Zhu & Gupta 2017, eq. 1): s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n dt))^3,
signature-compatible with (and meant to replace) `pruners.polynomial_sparsity`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LayerSchedule:
    """Iterative pruning schedule of one conv layer (hashable, so it can be a static jit argument).

    Attributes:
      num_filters: N, the layer's output channels.
      fraction: f, total fraction of the N filters pruned by the end, in [0, 1].
      start: first pruning epoch (0-based; the event happens after training epoch `start`).
      end: last epoch that may hold an event (inclusive).
      period: retrain period r in epochs; events at range(start, end + 1, period).
      name: layer name (e.g. the conv's param path), for bookkeeping only.
    """

    num_filters: int
    fraction: float
    start: int
    end: int
    period: int
    name: str = ""

    def __post_init__(self) -> None:
        label = f"LayerSchedule {self.name!r}" if self.name else "LayerSchedule"
        if int(self.num_filters) < 1:
            raise ValueError(f"{label}: num_filters must be >= 1, got {self.num_filters}")
        if not 0.0 <= float(self.fraction) <= 1.0:
            raise ValueError(f"{label}: fraction must lie in [0, 1], got {self.fraction}")
        if int(self.start) < 0:
            raise ValueError(f"{label}: start must be >= 0, got {self.start}")
        if int(self.end) < int(self.start):
            raise ValueError(f"{label}: end ({self.end}) must be >= start ({self.start})")
        if int(self.period) < 1:
            raise ValueError(f"{label}: period must be >= 1, got {self.period}")

    @property
    def epochs(self) -> tuple[int, ...]:
        """Pruning epochs (0-based), range(start, end + 1, period)."""
        return tuple(range(self.start, self.end + 1, self.period))

    @property
    def num_events(self) -> int:
        return len(self.epochs)

    @property
    def final_kept(self) -> int:
        return final_kept(self.num_filters, self.fraction)

    @property
    def counts(self) -> tuple[int, ...]:
        """Filters pruned at each event, k_1..k_n."""
        return event_counts(self.num_filters, self.fraction, self.num_events)

    @property
    def iterative_rate(self) -> float:
        """f / n, the paper's "iterative pruning rate" (fraction of the original N per event)."""
        return float(self.fraction) / self.num_events


class PruneEvent(NamedTuple):
    epoch: int  # 0-based epoch after whose training the event happens
    layer: int  # index into the layer list
    name: str
    iteration: int  # i, 1-based, of the layer's n events
    k: int  # filters pruned by this event (may be 0 because of the ceil)
    kept: int  # filters kept after the event


def final_kept(num_filters: int, fraction: float) -> int:
    """ceil((1 - f) N), in Python float arithmetic as the reference code."""
    return math.ceil((1 - float(fraction)) * int(num_filters))


def kept_after(num_filters: int, final: int, iteration: int, num_events: int) -> int:
    """current_kept_i = ceil(final + (N - final)(n - i) / n), in the reference's float maths."""
    return math.ceil(final + (num_filters - final) * (num_events - iteration) / num_events)


def event_counts(num_filters: int, fraction: float, num_events: int) -> tuple[int, ...]:
    """k_i = current_kept_{i-1} - current_kept_i, i = 1..n (notes §1.2); sums to N - final_kept."""
    if num_events < 1:
        raise ValueError(f"num_events must be >= 1, got {num_events}")
    final = final_kept(num_filters, fraction)
    kept = [num_filters] + [
        kept_after(num_filters, final, i, num_events) for i in range(1, num_events + 1)
    ]
    return tuple(a - b for a, b in zip(kept[:-1], kept[1:]))


def events(layers: Sequence[LayerSchedule]) -> list[PruneEvent]:
    """All events of all layers, sorted by (epoch, layer index); zero-count events are included."""
    out = []
    for li, layer in enumerate(layers):
        kept = layer.num_filters
        for i, (epoch, k) in enumerate(zip(layer.epochs, layer.counts), start=1):
            kept -= k
            out.append(PruneEvent(epoch, li, layer.name, i, k, kept))
    return sorted(out, key=lambda e: (e.epoch, e.layer))


def count_table(layers: Sequence[LayerSchedule], num_epochs: int) -> np.ndarray:
    """int32 array (num_epochs, L): filters to prune in layer l after training epoch e.

    Raises ValueError if an event falls at or after num_epochs (it would silently never happen).
    """
    if not layers:
        raise ValueError("count_table needs at least one LayerSchedule")
    table = np.zeros((int(num_epochs), len(layers)), np.int32)
    for li, layer in enumerate(layers):
        if layer.epochs[-1] >= num_epochs:
            raise ValueError(
                f"layer {li} ({layer.name!r}): event at epoch {layer.epochs[-1]} >= num_epochs "
                f"({num_epochs}); shorten `end` or train longer"
            )
        table[list(layer.epochs), li] = layer.counts
    return table


def pruning_epochs(table: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """(E,) bool: epochs at which at least one filter is pruned.

    These are the reference's "pruning epochs" (avg_pruned_magnitude > 0), over which mean stability
    is averaged; events whose count is 0 (ceil effects) do not count.
    """
    return table.sum(axis=-1) > 0


def last_pruning_epoch(table: np.ndarray) -> int:
    """Last epoch with a nonzero count, or -1 if the schedule never prunes."""
    idx = np.flatnonzero(np.asarray(pruning_epochs(table)))
    return int(idx[-1]) if idx.size else -1


def counts_at_epoch(
    epoch: jax.typing.ArrayLike,
    num_filters: jax.typing.ArrayLike,
    final: jax.typing.ArrayLike,
    start: jax.typing.ArrayLike,
    end: jax.typing.ArrayLike,
    period: jax.typing.ArrayLike,
) -> jax.Array:
    """Traceable k of every layer at `epoch` (); the other arguments are int arrays of shape (L,).

    Same counts as `count_table` with the ceil in integer arithmetic: current_kept_i =
    final + ceil((N - final)(n - i) / n), exact for all sizes (an integer plus a fraction >= 1/n
    never rounds across an integer in float64). `final` is `final_kept(N, f)` computed on the host,
    so the reference's float quirk in ceil((1 - f) N) is kept. The period may be traced.
    """
    epoch = jnp.asarray(epoch, jnp.int32)
    n = jnp.where(end >= start, (end - start) // period + 1, 0)
    offset = epoch - start
    is_event = (offset >= 0) & (epoch <= end) & (offset % period == 0)
    i = offset // period + 1  # 1-based iteration

    def kept(j: jax.Array) -> jax.Array:
        return final + -((-(num_filters - final) * (n - j)) // n)  # final + ceil(a / n)

    k = kept(i - 1) - kept(i)
    return jnp.where(is_event, k, 0).astype(jnp.int32)


def layer_arrays(layers: Sequence[LayerSchedule]) -> dict[str, np.ndarray]:
    """int32 (L,) arrays {num_filters, final, start, end, period} for `counts_at_epoch(e, **a)`."""
    return {
        "num_filters": np.array([s.num_filters for s in layers], np.int32),
        "final": np.array([s.final_kept for s in layers], np.int32),
        "start": np.array([s.start for s in layers], np.int32),
        "end": np.array([s.end for s in layers], np.int32),
        "period": np.array([s.period for s in layers], np.int32),
    }


# The paper's default schedules (notes §1.2): the last four convs, staggered starts.
PAPER_LAYERS = {
    "vgg11": dict(fractions=(0.3, 0.3, 0.3, 0.9), starts=(3, 4, 5, 6), ends=(150, 150, 150, 275)),
    "resnet18": dict(
        fractions=(0.25, 0.4, 0.25, 0.95), starts=(7, 8, 9, 10), ends=(150, 150, 170, 275)
    ),
}


def paper_layers(
    model: str,
    period: int,
    num_filters: Sequence[int] = (512, 512, 512, 512),
    names: Sequence[str] = ("conv5", "conv6", "conv7", "conv8"),
) -> list[LayerSchedule]:
    """The four LayerSchedules of `model` ("vgg11" or "resnet18") with retrain period `period`."""
    if model not in PAPER_LAYERS:
        raise ValueError(f"model must be one of {sorted(PAPER_LAYERS)}, got {model!r}")
    c = PAPER_LAYERS[model]
    return [
        LayerSchedule(int(n), f, s, e, int(period), name)
        for n, f, s, e, name in zip(num_filters, c["fractions"], c["starts"], c["ends"], names)
    ]


def polynomial_sparsity(
    step: jax.typing.ArrayLike,
    final_sparsity: jax.typing.ArrayLike,
    begin_step: jax.typing.ArrayLike,
    end_step: jax.typing.ArrayLike,
    initial_sparsity: jax.typing.ArrayLike = 0.0,
    power: float = 3.0,
    update_freq: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Zhu-Gupta eq. 1: s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n dt))^3, t1 = t0 + n dt = end_step.

    Clipped: s_i before t0, s_f after t1. With `update_freq` = dt, t is rounded down to the last
    update step t0 + j dt, so the value changes only on update steps (the paper's discrete
    schedule); without it the schedule is continuous in t. Every argument except `power` may be
    traced; a concrete end_step <= begin_step raises ValueError.
    """
    if not isinstance(end_step, jax.core.Tracer) and not isinstance(begin_step, jax.core.Tracer):
        if float(end_step) <= float(begin_step):
            raise ValueError(f"end_step ({end_step}) must exceed begin_step ({begin_step})")
    t = jnp.asarray(step, jnp.float32)
    t0 = jnp.asarray(begin_step, jnp.float32)
    t1 = jnp.asarray(end_step, jnp.float32)
    if update_freq is not None:
        dt = jnp.asarray(update_freq, jnp.float32)
        # Held between updates; from t1 on the schedule is s_f even when t1 is off the grid.
        t = jnp.where((t > t0) & (t < t1), t0 + jnp.floor((t - t0) / dt) * dt, t)
    progress = jnp.clip((t - t0) / (t1 - t0), 0.0, 1.0)
    s_i = jnp.asarray(initial_sparsity, jnp.float32)
    s_f = jnp.asarray(final_sparsity, jnp.float32)
    return s_f + (s_i - s_f) * (1.0 - progress) ** power


def is_update_step(
    step: jax.typing.ArrayLike,
    begin_step: jax.typing.ArrayLike,
    end_step: jax.typing.ArrayLike,
    update_freq: jax.typing.ArrayLike = 1,
) -> jax.Array:
    """True at t0, t0 + dt, ... up to t1, and at t1 (the steps at which Zhu-Gupta re-threshold the
    mask; t1 itself so that s_f is applied when t1 is off the grid)."""
    t = jnp.asarray(step, jnp.int32)
    t0 = jnp.asarray(begin_step, jnp.int32)
    t1 = jnp.asarray(end_step, jnp.int32)
    return (t >= t0) & (t <= t1) & (((t - t0) % update_freq == 0) | (t == t1))
