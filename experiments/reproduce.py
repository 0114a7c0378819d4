"""Reruns the studies whose outputs are committed under results/ and compares the new numbers.

  python -m experiments.reproduce --workdir=workdirs/reproduce              # every study, ~14 min
  python -m experiments.reproduce --studies=pft,linear_theory --workdir=w   # some of them
  python -m experiments.reproduce --list                                    # names and commands

Each study runs as `python -m MODULE --workdir=WORKDIR/NAME FLAGS` in a fresh process, exactly as
README gives it (its log goes to WORKDIR/NAME.log), and its text outputs are compared with
results/DIR, timing excluded:
* `*.jsonl` records: record by record, key by key; every number (also inside lists) and string;
* where a study commits no records, its `*.md` / `*.csv` tables: lines that mention time dropped,
  then the text around the numbers must match and the numbers are compared.
A study is "bitwise" when every compared value is equal, "float" when the largest relative
difference is at most `--rtol` (rounding of another CPU or code version), else "differs" (with the
largest difference and where it is), "structure" when records or text do not line up, "failed"
when the study exits non-zero, and "skipped" when its data is missing. Written: reproduce.md (the
host, then the table) and reproduce.jsonl. WORKDIR/NAME must be new (a study resumes from its
checkpoints). Training is bitwise reproducible on one host and code version; other CPUs round
differently and chaotic training amplifies it (README, "Reproducing the committed results").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from absl import app, flags

from jaxprune.data import FASHION_MNIST_DIR as FMNIST_DIR
# Keys and lines that hold wall or CPU times: they differ between any two runs.
TIMING_KEY = re.compile(r"seconds|wall|elapsed|(^|_)time($|_)|_s$", re.IGNORECASE)
TIMING_LINE = re.compile(r"wall|seconds|runtime|\bms\b", re.IGNORECASE)
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
COMPARED_SUFFIXES = (".jsonl", ".md", ".csv")

_FLATNESS_CPU = (  # README, "Flatness vs stability": the CPU run's cuts
    "--config.num_examples=512", "--config.hutchinson.probes=6", "--config.hutchinson.pruned_probes=2",
    "--config.hutchpp.matvecs=6", "--config.top_k=2", "--config.lanczos.iters=4",
    "--config.sharpness.directions=1", "--config.sharpness.radius=0.2", "--config.sharpness.step=0.05",
    "--config.sharpness.bisection_steps=5", "--config.sharpness.examples=512",
    "--config.expensive_every=8", "--config.power.k=2", "--config.power.max_iters=5",
    "--config.tic.examples=2", "--config.tic.maxiter=5", "--config.tic.tol=1e-3")


@dataclasses.dataclass(frozen=True)
class Study:
    """One committed result: `python -m module --workdir=... *args` should rewrite results/`results`.

    `{work}` in an argument is replaced by the reproduce workdir; `needs` are studies whose
    workdirs this one reads (run first); `data` is a path that must exist, else it is skipped."""
    results: str
    module: str
    args: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    data: str | None = None


STUDIES: dict[str, Study] = {
    "pft": Study("pft", "experiments.pft"),
    "linear_theory": Study("linear_theory", "experiments.linear_theory"),
    "pac_bayes": Study("pac_bayes", "experiments.pac_bayes"),
    "pac_bayes_fmnist": Study("pac_bayes_fmnist", "experiments.pac_bayes",
                              ("--config.preset=fashion_mnist_cpu",), data=FMNIST_DIR),
    "stability_cpu": Study("stability_cpu_canonical", "experiments.stability", data=FMNIST_DIR),
    "stability_overfit": Study("stability_overfit_canonical", "experiments.stability",
                               ("--config.preset=cpu_overfit", "--config.num_seeds=12"), data=FMNIST_DIR),
    "stability_wide": Study("stability_wide_canonical", "experiments.stability",
                            ("--config.preset=cpu_wide", "--config.num_seeds=8"), data=FMNIST_DIR),
    "noise_overfit": Study("noise_overfit", "experiments.noise_injection",
                           ("--config.preset=cpu_overfit", "--config.num_seeds=6"), data=FMNIST_DIR),
    "noise_confirm": Study("noise_confirm", "experiments.noise_injection",
                           ("--config.preset=cpu_overfit", "--config.num_seeds=12", "--config.seed=1000",
                            "--config.conditions=none,prune,zero:16"), data=FMNIST_DIR),
    "flatness_cpu": Study("flatness_canonical", "experiments.flatness",
                          ("--config.stability_workdir={work}/stability_cpu", *_FLATNESS_CPU),
                          needs=("stability_cpu",), data=FMNIST_DIR),
}


@dataclasses.dataclass
class Comparison:
    """Values compared, how many differ, and the largest difference (absolute, relative, where)."""
    compared: int = 0
    differing: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    where: str = ""
    structure: list[str] = dataclasses.field(default_factory=list)

    def add(self, new: Any, old: Any, where: str) -> None:
        self.compared += 1
        if isinstance(new, bool) or isinstance(old, bool) or not (
                isinstance(new, (int, float)) and isinstance(old, (int, float))):
            if new != old:  # text (or a number against text): no tolerance; the first one is named
                self.differing += 1
                self._keep(math.inf, math.inf, where)
            return
        if new == old or (math.isnan(new) and math.isnan(old)):
            return
        self.differing += 1
        diff = abs(new - old)
        self._keep(diff, diff / max(abs(new), abs(old)) if not math.isinf(diff) else math.inf, where)

    def merge(self, other: Comparison) -> None:
        self.compared += other.compared
        self.differing += other.differing
        self.structure += other.structure
        self._keep(other.max_abs, other.max_rel, other.where)

    def _keep(self, diff: float, rel: float, where: str) -> None:
        """Remembers the largest relative difference (ties: the larger absolute one, else the first)."""
        if rel > self.max_rel or (rel == self.max_rel and diff > self.max_abs):
            self.max_abs, self.max_rel, self.where = diff, rel, where


def _leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k in sorted(value):
            if not TIMING_KEY.search(k):
                yield from _leaves(value[k], f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, value


def compare_jsonl(new: str, old: str, name: str) -> Comparison:
    """Record i of `new` against record i of `old`: the same keys (timing keys dropped), then
    every leaf value."""
    out = Comparison()
    a = [json.loads(line) for line in new.splitlines() if line.strip()]
    b = [json.loads(line) for line in old.splitlines() if line.strip()]
    if len(a) != len(b):
        out.structure.append(f"{name}: {len(a)} records, committed {len(b)}")
        return out
    for i, (ra, rb) in enumerate(zip(a, b)):
        la, lb = list(_leaves(ra, f"{name}:{i + 1}")), list(_leaves(rb, f"{name}:{i + 1}"))
        if [p for p, _ in la] != [p for p, _ in lb]:
            missing = sorted({p for p, _ in la} ^ {p for p, _ in lb})
            out.structure.append(f"{name}:{i + 1}: keys differ ({', '.join(missing[:3])})")
            continue
        for (p, va), (_, vb) in zip(la, lb):
            out.add(va, vb, p)
    return out


def compare_text(new: str, old: str, name: str) -> Comparison:
    """Line by line, lines mentioning time dropped: the text between numbers must match, and the
    numbers are compared."""
    out = Comparison()
    a = [line for line in new.splitlines() if not TIMING_LINE.search(line)]
    b = [line for line in old.splitlines() if not TIMING_LINE.search(line)]
    if len(a) != len(b):
        out.structure.append(f"{name}: {len(a)} lines, committed {len(b)}")
        return out
    for i, (la, lb) in enumerate(zip(a, b)):
        if NUMBER.split(la) != NUMBER.split(lb):
            out.add(la, lb, f"{name}:{i + 1}")  # a text difference, e.g. another row named lowest
            continue
        for x, y in zip(NUMBER.findall(la), NUMBER.findall(lb)):
            out.add(float(x), float(y), f"{name}:{i + 1}")
    return out


def compared_files(old_dir: Path) -> list[Path]:
    """The committed .jsonl records (timing files aside); where there are none, the .md / .csv
    tables. Tables made from records are not compared again: they carry timing columns."""
    files = [f for f in sorted(old_dir.iterdir()) if f.suffix in COMPARED_SUFFIXES and "timing" not in f.name]
    records = [f for f in files if f.suffix == ".jsonl"]
    return records or files


def compare_dirs(new_dir: Path, old_dir: Path) -> Comparison:
    """`compared_files(old_dir)` against the same files in `new_dir`."""
    out = Comparison()
    for old in compared_files(old_dir):
        new = new_dir / old.name
        if not new.exists():
            out.structure.append(f"{old.name}: not written")
            continue
        compare = compare_jsonl if old.suffix == ".jsonl" else compare_text
        out.merge(compare(new.read_text(), old.read_text(), old.name))
    if out.compared == 0 and not out.structure:
        out.structure.append(f"nothing to compare in {old_dir}")
    return out


def verdict(c: Comparison, rtol: float) -> str:
    if c.structure:
        return "structure"
    if c.differing == 0:
        return "bitwise"
    return "float" if c.max_rel <= rtol else "differs"


def command(name: str, workdir: Path) -> list[str]:
    """The study's command line (README's), writing to workdir/name."""
    study = STUDIES[name]
    args = [a.replace("{work}", str(workdir)) for a in study.args]
    return [sys.executable, "-m", study.module, f"--workdir={workdir / name}", *args]


def shown(name: str, workdir: Path) -> str:
    """`command` as a user would type it."""
    return " ".join(["python", *command(name, workdir)[1:]])


def order(names: Sequence[str]) -> list[str]:
    """`names` with the studies they need first (each once), in registry order otherwise."""
    unknown = sorted(set(names) - set(STUDIES))
    if unknown:
        raise ValueError(f"unknown studies {unknown}; choose from {list(STUDIES)}")
    out: list[str] = []

    def visit(n: str) -> None:
        for m in STUDIES[n].needs:
            visit(m)
        if n not in out:
            out.append(n)

    for n in STUDIES:
        if n in names:
            visit(n)
    return out


def run_process(cmd: Sequence[str], log: Path) -> int:
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode


def reproduce(names: Sequence[str], workdir: str, results_dir: str = "results", rtol: float = 1e-5,
              runner: Callable[[Sequence[str], Path], int] = run_process) -> list[dict[str, Any]]:
    """Runs `names` (and what they need) into workdir/NAME, which must be new or empty, and
    compares each with results_dir/DIR; one row per study, also written to reproduce.md and
    reproduce.jsonl."""
    work = Path(workdir).resolve()
    names = order(names)
    # A study resumes from the checkpoints in its workdir: a rerun there would not recompute.
    used = [str(work / n) for n in names if (work / n).is_dir() and any((work / n).iterdir())]
    if used:
        raise ValueError(f"study workdirs that already hold outputs: {', '.join(used)}; the studies "
                         f"would resume from them instead of rerunning. Remove them or choose "
                         f"another --workdir")
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    status: dict[str, str] = {}
    for i, name in enumerate(names, 1):
        study = STUDIES[name]
        row: dict[str, Any] = {"study": name, "results": f"{results_dir}/{study.results}",
                               "command": shown(name, work)}
        blocked = [m for m in study.needs if status.get(m) in ("failed", "skipped")]
        if study.data is not None and not os.path.exists(study.data):
            row.update(verdict="skipped", note=f"data missing: {study.data} (make data)")
        elif blocked:
            row.update(verdict="skipped", note=f"needs {', '.join(blocked)}")
        elif not (Path(results_dir) / study.results).is_dir():
            row.update(verdict="skipped", note=f"no committed {results_dir}/{study.results}")
        else:
            print(f"# reproduce [{i}/{len(names)}] {name}: {row['command']}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            code = runner(command(name, work), work / f"{name}.log")
            row["wall_s"] = round(time.perf_counter() - start, 1)
            if code != 0:
                row.update(verdict="failed", note=f"exit status {code}; see {work / name}.log")
            else:
                c = compare_dirs(work / name, Path(results_dir) / study.results)
                row.update(verdict=verdict(c, rtol), compared=c.compared, differing=c.differing,
                           max_abs=c.max_abs, max_rel=c.max_rel, where=c.where,
                           note="; ".join(c.structure[:3]))
        status[name] = row["verdict"]
        rows.append(row)
        note = f" ({row['note']})" if row.get("note") else ""
        print(f"# reproduce [{i}/{len(names)}] {name}: {row['verdict']}{note}", file=sys.stderr, flush=True)
    (work / "reproduce.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "reproduce.md").write_text(f"# reproduce: {host()}\n\n{table(rows)}")
    return rows


def host() -> str:
    """Where the reruns ran. Bitwise equality needs the same code, jax version and CPU signature
    (`common.host_cpu_signature`: model and instruction sets, which XLA's CPU code generation reads)."""
    # Imported here: they pull in the models and flax, which the parent needs only for this line.
    from experiments.benchmarks.roofline import machine
    from experiments.common import host_cpu_signature

    return (f"python {platform.python_version()}, {machine()}, CPU signature {host_cpu_signature()}, "
            f"{time.strftime('%Y-%m-%d')}")


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| study | verdict | values compared | differing | max relative diff | where | wall s | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = r.get("max_rel")
        rel_s = "" if rel is None else ("text" if math.isinf(rel) else f"{rel:.2g}")
        lines.append(f"| {r['study']} | {r['verdict']} | {r.get('compared', '')} | {r.get('differing', '')} "
                     f"| {rel_s} | {r.get('where', '')} | {r.get('wall_s', '')} | {r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _LIST.value:
        for name, study in STUDIES.items():
            print(f"{name}: results/{study.results} <- {shown(name, Path(_WORKDIR.value))}")
        return
    try:
        rows = reproduce(_STUDIES.value or list(STUDIES), _WORKDIR.value, _RESULTS.value, _RTOL.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    print(table(rows))
    sys.exit(1 if any(r["verdict"] == "failed" for r in rows) else 0)


if __name__ == "__main__":
    _WORKDIR = flags.DEFINE_string("workdir", "workdirs/reproduce", "Where the reruns write.")
    _STUDIES = flags.DEFINE_list("studies", [], f"Studies to rerun (default: all of {list(STUDIES)}).")
    _RESULTS = flags.DEFINE_string("results_dir", "results", "The committed results to compare with.")
    _RTOL = flags.DEFINE_float("rtol", 1e-5, "Largest relative difference still called 'float'.")
    _LIST = flags.DEFINE_bool("list", False, "Print the studies and their commands, run nothing.")
    app.run(main)
