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
