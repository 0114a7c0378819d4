"""Quick presets of the foundation and PFT experiments run end to end and write their files."""

import json
import os
import warnings

import pytest

pytestmark = pytest.mark.usefixtures("fast_compile")


def _lines(path):
    with open(path) as f:
        return [json.loads(l) for l in f]


def test_prune_baselines_quick(tmp_path):
    from experiments import prune_baselines

    c = prune_baselines.get_config()
    c.quick = True
    out = prune_baselines.run(c, str(tmp_path))
    for f in ("config.json", "dense.jsonl", "dense.csv", "results.jsonl", "results.csv", "table.md", "errors.png"):
        assert os.path.getsize(tmp_path / f) > 0, f
    rows = _lines(tmp_path / "results.jsonl")
    assert len(rows) == 3 * 2 * 2 and len(rows[0]["test_error"]) == 2
    for r in rows:
        assert abs(r["achieved_sparsity"] - r["sparsity"]) < 1e-3
        assert 0.0 <= r["mean"] <= 1.0
    assert out["dense"]["mean"] < 0.5  # digits MLP learns in 3 epochs


def test_pft_quick(tmp_path):
    from experiments import pft

    c = pft.get_config()
    c.quick = True
    out = pft.run(c, str(tmp_path))
    for f in ("config.json", "results.jsonl", "table.md", "errors.png", "estimators.png", "estimators.jsonl"):
        assert os.path.getsize(tmp_path / f) > 0, f
    methods = {r["method"] for r in out["results"]}
    assert {"baseline", "baseline_ft", "pft[concrete]_topk", "pft[rloo]_stochastic", "pft[rloo]_half"} <= methods
    est = {r["estimator"]: r for r in out["estimators"]}
    assert est["rloo"]["total_variance"] > est["concrete"]["total_variance"] > 0
    assert out["dense"]["mean"] < 0.5


def test_make_model_drops_the_kwargs_of_another_model():
    """A study's locked config keeps its default model's kwargs (prune_baselines: the MLP's widths);
    `--config.model.name=small_cnn` must still build a SmallCNN, warning about what it dropped, and
    kwargs the model does take must reach it."""
    from experiments import common, prune_baselines
    from jaxprune import models

    c = prune_baselines.get_config()
    c.model.name = "small_cnn"
    with pytest.warns(UserWarning, match=r"model 'small_cnn' does not take widths=\(256, 128\)"):
        model = common.make_model(c.model, 10)
    assert isinstance(model, models.SmallCNN)
    c = prune_baselines.get_config()
    c.model.kwargs.widths = (8,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped, nothing to warn about
        assert common.make_model(c.model, 10).widths == (8,)


# ------------------------------------------------------------------------ experiments/common.py


def test_write_records_jsonl_and_csv_round_trip(tmp_path):
    """Arrays and numpy scalars become plain values, the CSV header is the union of every record's
    keys in first-seen order, lists are JSON strings in the CSV and missing cells are empty.
    Catches a header taken from the first record only and lists written as Python reprs."""
    import csv

    import jax.numpy as jnp
    import numpy as np

    from experiments import common

    records = [{"run": np.int64(0), "acc": np.float32(0.5), "top": np.array([3.0, 1.5])},
               {"run": 1, "acc": jnp.float32(0.25), "top": [2.0, None], "extra": {"ok": True}}]
    common.write_records(str(tmp_path), "r", records)
    assert _lines(tmp_path / "r.jsonl") == [{"run": 0, "acc": 0.5, "top": [3.0, 1.5]},
                                            {"run": 1, "acc": 0.25, "top": [2.0, None],
                                             "extra": {"ok": True}}]
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.reader(f))
    assert rows == [["run", "acc", "top", "extra"], ["0", "0.5", "[3.0, 1.5]", ""],
                    ["1", "0.25", "[2.0, null]", '{"ok": true}']]


def test_summarize_is_the_t_interval_and_fmt_ci_its_half_width():
    """mean ± t_{n-1, 0.975} s / sqrt(n) (scipy), and fmt_ci prints mean and half-width in percent.
    Catches a normal quantile or ddof = 0 in the interval, and a full width printed as ±."""
    import numpy as np
    from scipy import stats as sps

    from experiments import common

    v = [0.81, 0.84, 0.78, 0.86]
    s = common.summarize(v)
    lo, hi = sps.t.interval(0.95, 3, loc=np.mean(v), scale=sps.sem(v))
    assert s["mean"] == pytest.approx(np.mean(v), abs=1e-15)
    assert (s["ci_lo"], s["ci_hi"]) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    want = f"{100 * np.mean(v):.2f} ± {100 * (hi - lo) / 2:.2f}"
    assert common.fmt_ci(s) == want == "82.25 ± 5.57"
    assert common.fmt_ci(common.summarize([0.5])) == "50.00"  # one seed: no interval
    assert common.markdown_table([{"a": 1 / 3, "b": "x"}, {"a": 2}], ["a", "b"]) == (
        "| a | b |\n|---|---|\n| 0.3333 | x |\n| 2 |  |\n")


def test_parse_list_and_seed_streams():
    """parse_list skips empty items and casts; seed_streams gives S keys per named stream, all
    distinct, the same on every call, and stream i of seed s is split(seed_keys[s], K)[i].
    Catches two streams sharing keys (e.g. 'init' reused as 'data'), which would correlate the
    initialisation with the data order."""
    import jax
    import numpy as np

    from experiments import common
    from jaxprune import train

    assert common.parse_list(" a, b,,c ,") == ["a", "b", "c"]
    assert common.parse_list("1, 2", int) == [1, 2]
    assert common.parse_list((0.5, 1), float) == [0.5, 1.0]
    keys = common.seed_streams(3, 4, ("init", "data", "prune"))
    data = {n: np.asarray(jax.random.key_data(k)) for n, k in keys.items()}
    assert all(v.shape[0] == 4 for v in data.values())
    flat = np.concatenate(list(data.values()))
    assert len({tuple(r) for r in flat}) == 12
    again = common.seed_streams(3, 4, ("init", "data", "prune"))
    for n in keys:
        np.testing.assert_array_equal(jax.random.key_data(again[n]), data[n])
    want = jax.random.split(train.seed_keys(3, 4)[2], 3)[1]
    np.testing.assert_array_equal(jax.random.key_data(want), data["data"][2])
