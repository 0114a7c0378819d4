"""experiments.reproduce: the comparisons, the study order, and a whole run with a stand-in runner."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import reproduce as rp

REPO = Path(__file__).resolve().parents[1]


def _jsonl(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_compare_jsonl_bitwise_ignores_timing_keys():
    a = _jsonl({"x": 1.5, "fit_seconds": 3.0, "v": [1, 2], "name": "kl"})
    b = _jsonl({"x": 1.5, "fit_seconds": 9.0, "v": [1, 2], "name": "kl"})
    c = rp.compare_jsonl(a, b, "r.jsonl")
    assert (c.compared, c.differing, c.structure) == (3 + 1, 0, [])  # x, v[0], v[1], name
    assert rp.verdict(c, 1e-5) == "bitwise"


def test_compare_jsonl_reports_the_largest_relative_difference_and_where():
    a = _jsonl({"a": 1.0, "b": [100.0, 2.0]}, {"a": 5.0, "b": [0.0, 0.0]})
    b = _jsonl({"a": 1.0 + 1e-7, "b": [100.1, 2.0]}, {"a": 5.0, "b": [0.0, 0.0]})
    c = rp.compare_jsonl(a, b, "r.jsonl")
    assert (c.compared, c.differing) == (6, 2)
    assert c.where == "r.jsonl:1.b[0]"
    assert c.max_abs == pytest.approx(0.1) and c.max_rel == pytest.approx(0.1 / 100.1)
    assert rp.verdict(c, 1e-5) == "differs" and rp.verdict(c, 1e-2) == "float"


def test_compare_jsonl_strings_nan_and_structure():
    nan = float("nan")
    c = rp.compare_jsonl(_jsonl({"h": "abc", "r": nan}), _jsonl({"h": "abd", "r": nan}), "f")
    assert (c.differing, c.where, math.isinf(c.max_rel)) == (1, "f:1.h", True)
    assert rp.verdict(c, 1.0) == "differs"  # a string never counts as float rounding
    short = rp.compare_jsonl(_jsonl({"a": 1}), _jsonl({"a": 1}, {"a": 2}), "f")
    assert short.structure == ["f: 1 records, committed 2"] and rp.verdict(short, 1.0) == "structure"
    keys = rp.compare_jsonl(_jsonl({"a": 1}), _jsonl({"b": 1}), "f")
    assert rp.verdict(keys, 1.0) == "structure"


def test_compare_text_drops_timing_lines_and_compares_numbers():
    old = "# T\nWall time 230 s.\n| a | 0.25 | S_r1 |\nLowest: quad 7.97 %\n"
    new = "# T\nWall time 63 s.\n| a | 0.2500001 | S_r1 |\nLowest: quad 7.97 %\n"
    c = rp.compare_text(new, old, "t.md")
    # "T" has no number; line 2 is dropped; line 3: 0.25 and the "1" of S_r1; line 4: 7.97
    assert (c.compared, c.differing, c.where) == (3, 1, "t.md:2")
    assert c.max_rel == pytest.approx(1e-7 / 0.2500001)
    flipped = rp.compare_text(new.replace("quad", "lambda"), old, "t.md")
    assert flipped.where == "t.md:3" and math.isinf(flipped.max_rel)


def test_compared_files_prefer_records(tmp_path):
    for name in ("table.md", "runs.jsonl", "timing.jsonl", "summary.csv", "plot.png"):
        (tmp_path / name).write_text("")
    assert [f.name for f in rp.compared_files(tmp_path)] == ["runs.jsonl"]
    (tmp_path / "runs.jsonl").unlink()
    assert [f.name for f in rp.compared_files(tmp_path)] == ["summary.csv", "table.md"]


def test_order_puts_needed_studies_first_and_rejects_unknown_names():
    assert rp.order(["flatness_cpu"]) == ["stability_cpu", "flatness_cpu"]
    assert rp.order(["flatness_cpu", "pft", "stability_cpu"]) == ["pft", "stability_cpu", "flatness_cpu"]
    with pytest.raises(ValueError, match="unknown studies.*'nope'"):
        rp.order(["pft", "nope"])


def test_every_study_names_a_committed_results_dir_and_an_importable_module():
    for name, study in rp.STUDIES.items():
        assert (REPO / "results" / study.results).is_dir(), name
        assert (REPO / "experiments" / (study.module.split(".")[1] + ".py")).is_file(), name
        assert rp.compared_files(REPO / "results" / study.results), name


def test_reproduce_with_a_stand_in_runner(tmp_path, monkeypatch):
    """Whole run: commands, the {work} substitution, verdicts, skips and the written table."""
    results = tmp_path / "results"
    for d, text in (("a", _jsonl({"x": 1.0, "wall_seconds": 5.0})), ("b", _jsonl({"x": 2.0})),
                    ("c", _jsonl({"x": 3.0}))):
        (results / d).mkdir(parents=True)
        (results / d / "runs.jsonl").write_text(text)
    monkeypatch.setattr(rp, "STUDIES", {
        "first": rp.Study("a", "experiments.m1"),
        "second": rp.Study("b", "experiments.m2", ("--in={work}/first",), needs=("first",)),
        "third": rp.Study("c", "experiments.m3", data=str(tmp_path / "absent")),
        "fourth": rp.Study("c", "experiments.m4", needs=("third",)),
    })
    calls = []

    def runner(cmd, log):
        calls.append(cmd)
        out = Path(cmd[3].removeprefix("--workdir="))
        out.mkdir(parents=True)
        value = {"experiments.m1": 1.0, "experiments.m2": 2.0 + 1e-9}[cmd[2]]
        (out / "runs.jsonl").write_text(_jsonl({"x": value, "wall_seconds": 7.0}))
        log.write_text("ok")
        return 0

    work = tmp_path / "work"
    rows = rp.reproduce(["second", "fourth"], str(work), str(results), 1e-6, runner=runner)
    assert [c[1:] for c in calls] == [
        ["-m", "experiments.m1", f"--workdir={work / 'first'}"],
        ["-m", "experiments.m2", f"--workdir={work / 'second'}", f"--in={work / 'first'}"]]
    got = {r["study"]: r["verdict"] for r in rows}
    assert got == {"first": "bitwise", "second": "float", "third": "skipped", "fourth": "skipped"}
    assert rows[1]["max_abs"] == pytest.approx(1e-9) and rows[1]["where"] == "runs.jsonl:1.x"
    assert "data missing" in rows[2]["note"] and rows[3]["note"] == "needs third"
    written = [json.loads(line) for line in (work / "reproduce.jsonl").read_text().splitlines()]
    assert [r["verdict"] for r in written] == ["bitwise", "float", "skipped", "skipped"]
    md = (work / "reproduce.md").read_text()
    assert md.startswith("# reproduce: python ") and ", jax " in md and "CPU signature " in md
    assert md.count("\n") == 2 + 2 + 4  # host line, blank line, header, rows


def test_a_failing_study_is_reported_and_its_dependants_skipped(tmp_path, monkeypatch):
    (tmp_path / "results" / "a").mkdir(parents=True)
    (tmp_path / "results" / "a" / "runs.jsonl").write_text(_jsonl({"x": 1}))
    monkeypatch.setattr(rp, "STUDIES", {"first": rp.Study("a", "experiments.m1"),
                                        "second": rp.Study("a", "experiments.m2", needs=("first",))})
    rows = rp.reproduce(["second"], str(tmp_path / "w"), str(tmp_path / "results"),
                        runner=lambda cmd, log: 3)
    assert [(r["verdict"], r["note"]) for r in rows] == [
        ("failed", f"exit status 3; see {(tmp_path / 'w').resolve() / 'first'}.log"),
        ("skipped", "needs first")]


def test_a_used_workdir_is_refused_before_anything_runs(tmp_path, monkeypatch):
    (tmp_path / "results" / "a").mkdir(parents=True)
    monkeypatch.setattr(rp, "STUDIES", {"first": rp.Study("a", "experiments.m1"),
                                        "second": rp.Study("a", "experiments.m2", needs=("first",))})
    (tmp_path / "w" / "first").mkdir(parents=True)
    (tmp_path / "w" / "first" / "ckpt").mkdir()
    (tmp_path / "w" / "second").mkdir()  # empty: fine
    calls = []
    with pytest.raises(ValueError, match="already hold outputs: .*first; the studies would resume"):
        rp.reproduce(["second"], str(tmp_path / "w"), str(tmp_path / "results"),
                     runner=lambda cmd, log: calls.append(cmd) or 0)
    assert calls == []


def test_list_prints_every_study_without_running(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--list", f"--workdir={tmp_path}"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert len(out.splitlines()) == len(rp.STUDIES)
    assert f"--config.stability_workdir={tmp_path}/stability_cpu" in out
