"""Compare runs: group run folders by configuration, one markdown table, one plot.

    python eval.py compare runs/sweep [MORE_RUN_OR_SWEEP_DIRS] [--baseline grpo] [--plot FILE.png]

A configuration: every train.py argument in run.json (runrecord.py) but NON_SEMANTIC ones, the model's hash for
its path (the algorithm is one). Per configuration, over its complete runs: held-out avg@k and pass@k at the final
step as mean ± 95% Student-t interval over seeds, the paired difference to the baseline over the seeds both have,
generated tokens, wall time, seconds per step. Runs without `done` in run.json are listed and left out. The plot:
avg@k against generated tokens, runs interpolated onto a common token grid, mean and 95% t-band across seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import runrecord

NON_SEMANTIC = {"seed", "out", "resume", "save_every", "keep_checkpoints", "eval_every", "gpu_memory_utilization",
                "report_to"}
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)  # Student t, 97.5% quantile, df = 1..30


def t_quantile_975(df: int) -> float:
    """Two-sided 95%: the table above; past 30 df the Cornish-Fisher expansion around z (error < 1e-5)."""
    if df < 1:
        raise ValueError(f"a t quantile needs df >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959963984540054
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_ci(xs: list[float]) -> tuple[float, float | None]:
    """-> (mean, half-width of the 95% t-interval); None for one value (no spread to estimate)."""
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = sum(xs) / n
    if n == 1:
        return mean, None
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, t_quantile_975(n - 1) * sd / math.sqrt(n)


def fmt_ci(xs: list[float], signed: bool = False, of: int | None = None) -> str:
    """'0.600 ± 0.248'; one value: '0.600 (n=1, no interval)'; `of` more runs than values:
    '0.600 ± 0.248 (n=3 of 4)'."""
    if not xs:
        return "–"
    mean, half = mean_ci(xs)
    text = (f"{mean:+.3f}" if signed else f"{mean:.3f}") + (f" ± {half:.3f}" if half is not None else "")
    return text + (f" (n={len(xs)} of {of})" if of and of > len(xs) else " (n=1, no interval)" if half is None else "")


def fmt_duration(seconds: float) -> str:
    return (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200
            else f"{seconds / 3600:.1f} h")


# ---------------------------------------------------------------------------------------------
# Reading run folders


@dataclass
class Run:
    folder: Path
    args: dict
    record: dict
    complete: bool
    steps: int = 0  # last logged step
    final: dict | None = None  # the eval line at the final step: {"avg", "pass", "k", "problems"}
    curve: list = field(default_factory=list)  # [(generated tokens, avg@k)] of every evaluation
    generated_tokens: int = 0
    seconds: float = 0.0  # time/step + time/eval
    seconds_per_step: float | None = None

    @property
    def seed(self) -> int:
        return self.args["seed"]


def read_run(folder) -> Run:
    """One run folder -> Run; a folder without run.json or a complete run without metrics.jsonl is an error."""
    folder = Path(folder)
    record = runrecord.load(folder)
    if record is None:
        raise FileNotFoundError(f"{folder}: no {runrecord.RECORD} (not a run folder, or a run from before run records)")
    run = Run(folder, runrecord.effective_args(record), record, bool(record.get("done")))
    path = folder / "metrics.jsonl"
    if not path.is_file():
        if run.complete:
            raise FileNotFoundError(f"{folder}: run.json says done but there is no metrics.jsonl")
        return run
    lines, rows = [line for line in path.read_text().splitlines() if line.strip()], []
    for i, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if run.complete or i < len(lines):  # only a killed run's cut-off last line is expected
                raise ValueError(f"{path}: line {i} is not JSON") from None
    steps = [r for r in rows if "time/step" in r]
    if any("generated_tokens_total" not in r for r in steps):
        raise ValueError(f"{path}: step lines without generated_tokens_total (a run from an older train.py)")
    tokens_at = {0: 0, **{r["step"]: r["generated_tokens_total"] for r in steps}}
    run.steps = max((r["step"] for r in steps), default=0)
    run.generated_tokens = steps[-1]["generated_tokens_total"] if steps else 0
    run.seconds = sum(r.get("time/step", 0.0) + r.get("time/eval", 0.0) for r in rows)
    run.seconds_per_step = sum(r["time/step"] for r in steps) / len(steps) if steps else None
    evals = [r for r in rows if "eval/avg_at_k" in r]
    run.curve = [(tokens_at[r["step"]], r["eval/avg_at_k"]) for r in evals if r["step"] in tokens_at]
    final_step = record["done"]["step"] if run.complete else run.steps
    if evals and evals[-1]["step"] == final_step:
        e = evals[-1]
        run.final = {"avg": e["eval/avg_at_k"], "pass": e["eval/pass_at_k"], "k": e.get("eval/k"),
                     "problems": e.get("eval/problems")}
    return run


def find_run_folders(paths) -> list[Path]:
    """Each path is a run folder (has run.json or metrics.jsonl) or a folder of them (a sweep)."""
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such folder")
        is_run = lambda p: (p / runrecord.RECORD).is_file() or (p / "metrics.jsonl").is_file()  # noqa: E731
        runs = [path] if is_run(path) else sorted(p for p in path.iterdir() if p.is_dir() and is_run(p))
        if not runs:
            raise FileNotFoundError(f"{path}: no run folders (no {runrecord.RECORD} or metrics.jsonl in it "
                                    "or its subfolders)")
        found += runs
    return found


def config_key(run: Run, unrecorded=()) -> str:
    """The run's configuration as a string; `unrecorded`: flags left out (see `partially_recorded`)."""
    config = {k: v for k, v in run.args.items() if k not in NON_SEMANTIC and k not in unrecorded}
    config["model"] = run.record.get("model", {}).get("sha256") or config.get("model")
    return json.dumps(config, sort_keys=True, default=str)


def partially_recorded(runs: list[Run]) -> dict[str, str]:
    """Flags that some runs' run.json lacks (written by a train.py without them) while every run that has them agrees on
    one value -> {flag: that value}. They are left out of the configuration, so runs of older and newer code pool, and
    a note says so: the older code is taken to behave as that value. A flag with several values keeps runs apart."""
    present = [set(r.args) for r in runs]
    partial = set().union(*present) - set.intersection(*present) - NON_SEMANTIC if runs else set()
    values = {k: {json.dumps(r.args[k], default=str) for r in runs if k in r.args} for k in partial}
    return {k: next(iter(v)) for k, v in sorted(values.items()) if len(v) == 1}


def explicit_flags(run: Run) -> set[str]:
    """The argument names given on the command line (not defaults): what a row label may show."""
    argv = run.record.get("argv", []) + [t for r in run.record.get("resumes", []) for t in r.get("argv", [])]
    return {t[2:].split("=")[0].replace("-", "_") for t in argv if t.startswith("--")}


@dataclass
class Group:
    label: str
    runs: list  # complete runs, one per seed, by seed
    shown: dict  # the label's flags and values

    @property
    def args(self) -> dict:
        return self.runs[0].args


def group_runs(runs: list[Run]) -> tuple[list[Group], list[str]]:
    """Complete runs grouped by configuration -> (groups, notes on what was left out). Label: the algorithm and the
    flags given explicitly that differ between configurations (and, for configurations still alike, what differs)."""
    notes, by_key = [], {}
    # an algorithm's own flags exist only in its runs: look within each algorithm
    complete = [r for r in runs if r.complete]
    by_algo = {a: partially_recorded([r for r in complete if r.args["algo"] == a])
               for a in {r.args["algo"] for r in complete}}
    unrecorded = {k: v for flags in by_algo.values() for k, v in flags.items()}
    if unrecorded:
        notes.append("not recorded by every run of an algorithm (older code), so not compared: " + ", ".join(
            f"{k}={v}" for k, v in sorted(unrecorded.items()))
            + " in the runs that record it; the others are taken to behave the same")
    for run in runs:
        if not run.complete:
            notes.append(f"incomplete, left out: `{run.folder}` (last logged step {run.steps}; no `done` in run.json)")
            continue
        same = by_key.setdefault(config_key(run, by_algo[run.args["algo"]]), {})
        if run.seed in same:
            notes.append(f"left out: `{run.folder}` has the configuration and seed of `{same[run.seed].folder}`")
            continue
        same[run.seed] = run
    members = [[r for _, r in sorted(seeds.items())] for seeds in by_key.values()]
    flags = set().union(*(explicit_flags(r) for rs in members for r in rs)) - NON_SEMANTIC - {"algo"} - set(unrecorded)
    shown = sorted(k for k in flags
                   if len({json.dumps(rs[0].args.get(k), default=str) for rs in members if k in rs[0].args}) > 1)
    order = lambda v: (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))  # noqa: E731 - numbers by value
    members.sort(key=lambda rs: (rs[0].args["algo"], [order(rs[0].args.get(k)) for k in shown]))
    labels = [" ".join([rs[0].args["algo"]] + [f"{k}={rs[0].args[k]}" for k in shown if k in rs[0].args])
              for rs in members]
    configs = [json.loads(config_key(rs[0], by_algo[rs[0].args["algo"]])) for rs in members]
    items = [{k: rs[0].args[k] for k in shown if k in rs[0].args} for rs in members]
    # configurations the shown flags do not tell apart (e.g. a newer train.py's new flag): add what differs
    for label in set(labels):
        same = [i for i, other in enumerate(labels) if other == label]
        differ = sorted(k for k in set().union(*(configs[i] for i in same))
                        if len({json.dumps(configs[i].get(k)) for i in same}) > 1)
        for i in same:
            labels[i] += "".join(f" {k}={configs[i].get(k)}" for k in differ)
            items[i].update({k: configs[i].get(k) for k in differ})
    groups = [Group(*group) for group in zip(labels, members, items)]
    for g in groups:
        gits = [r.record.get("git") or {"commit": "no git"} for r in g.runs]
        commits = {str(git["commit"])[:10] + ("+dirty" if git.get("dirty") else "") for git in gits}
        if len(commits) > 1:
            notes.append(f"{g.label}: its runs come from {len(commits)} code versions ({', '.join(sorted(commits))})")
    return groups, notes


def baseline_for(group: Group, groups: list[Group], baseline: str) -> Group | None:
    """The baseline row to pair with: the one labelled `baseline`, else the one of that algorithm whose label agrees."""
    exact = [g for g in groups if g.label == baseline]
    if exact:
        return exact[0]
    same = [g for g in groups if g.args["algo"] == baseline
            and all(g.shown[k] == v for k, v in group.shown.items() if k in g.shown)]
    return same[0] if len(same) == 1 else None


def paired_differences(group: Group, base: Group, metric: str = "avg") -> list[float]:
    """group - baseline per seed, over the seeds where both have a final evaluation."""
    theirs = {r.seed: r.final[metric] for r in base.runs if r.final}
    return [r.final[metric] - theirs[r.seed] for r in group.runs if r.final and r.seed in theirs]


# ---------------------------------------------------------------------------------------------
# The table and the plot


def markdown_table(groups: list[Group], notes: list[str], baseline: str) -> str:
    notes, evaluated = list(notes), [r.final for g in groups for r in g.runs if r.final]
    ks = {f["k"] for f in evaluated}
    k = str(ks.pop()) if len(ks) == 1 else "k"
    lines = [f"| configuration | seeds | held-out avg@{k} | pass@{k} | Δ avg@{k} vs {baseline} (paired seeds) "
             "| generated tokens | wall time | s/step |", "|---|---|---|---|---|---|---|---|"]
    no_eval = []
    for g in groups:
        finals = [r.final for r in g.runs if r.final]
        no_eval += [str(r.folder) for r in g.runs if not r.final]
        base = baseline_for(g, groups, baseline)
        if base is g:
            delta = "baseline"
        elif base is None:
            delta = "– (no baseline row)"
        else:
            diffs = paired_differences(g, base)
            delta = (fmt_ci(diffs, signed=True) + (f" ({len(diffs)} seeds)" if len(diffs) > 1 else "") if diffs
                     else "– (no shared seeds)")
        seeds = ",".join(str(r.seed) for r in g.runs)
        tokens, _ = mean_ci([r.generated_tokens for r in g.runs])
        seconds, _ = mean_ci([r.seconds for r in g.runs])
        per_step = [r.seconds_per_step for r in g.runs if r.seconds_per_step is not None]
        lines.append(f"| {g.label} | {len(g.runs)} ({seeds}) | {fmt_ci([f['avg'] for f in finals], of=len(g.runs))} | "
                     f"{fmt_ci([f['pass'] for f in finals], of=len(g.runs))} | {delta} | {tokens:,.0f} | "
                     f"{fmt_duration(seconds)} | "
                     + (f"{sum(per_step) / len(per_step):.1f} |" if per_step else "– |"))
    problems = {f["problems"] for f in evaluated}
    budgets = {g.args.get("token_budget") for g in groups}
    lines += ["", f"Mean ± 95% Student-t interval over seeds (n - 1 df; one seed: no interval). "
              f"Held-out avg@{k} / pass@{k}: the evaluation at each run's final step "
              f"({'/'.join(map(str, sorted(problems))) or 'no'} problems). Δ: the mean per-seed difference to "
              f"{baseline} (same flags otherwise) over the seeds both have, with the t-interval of those differences. "
              "Generated tokens: training rollouts (evaluation not counted), mean per run; wall time: seconds in "
              "steps and evaluations, mean per run (loading and restarts not counted)."]
    if len(budgets) > 1:
        notes.append(f"the configurations have different --token-budget values: {sorted(budgets, key=str)}")
    if no_eval:
        notes.append("no held-out evaluation at the final step (shown as –): " + ", ".join(f"`{f}`" for f in no_eval))
    return "\n".join(lines + [f"- {n}" for n in notes]) + "\n"


def plot_curves(groups: list[Group], path: Path, points: int = 50) -> Path | None:
    """avg@k against generated tokens: per configuration the mean and the 95% t-band across seeds, each run linearly
    interpolated onto a grid from 0 to the fewest tokens any of its runs reached. None: no run has two evaluations."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = [g for g in groups if any(len(r.curve) >= 2 for r in g.runs)]
    for g in drawn:
        curves = [r.curve for r in g.runs if len(r.curve) >= 2]
        grid = np.linspace(0, min(c[-1][0] for c in curves), points)
        ys = np.array([np.interp(grid, [x for x, _ in c], [y for _, y in c]) for c in curves])  # [runs, points]
        stats = [mean_ci(list(col)) for col in ys.T]
        mean = np.array([m for m, _ in stats])
        line, = ax.plot(grid, mean, label=f"{g.label} ({len(curves)} seeds)")
        if len(curves) > 1:
            half = np.array([h for _, h in stats])
            ax.fill_between(grid, mean - half, mean + half, color=line.get_color(), alpha=0.2)
    if not drawn:
        plt.close(fig)
        return None
    (ax.set_xlabel("generated training tokens"), ax.set_ylabel("held-out avg@k"), ax.grid(alpha=0.3),
     ax.legend(fontsize=8))
    ax.set_title("mean and 95% t-band across seeds (runs interpolated onto a common token grid)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="eval.py compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="run folders, or folders of run folders (a sweep's --out)")
    ap.add_argument("--baseline", default="grpo", help="algorithm (or full row label) the Δ column pairs against")
    ap.add_argument("--plot", default=None,
                    help="PNG of avg@k vs generated tokens (default: FIRST_DIR/compare_avg_at_k.png)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    try:
        runs, skipped = [], []
        for folder in find_run_folders(args.dirs):
            if runrecord.load(folder) is None:
                skipped.append(f"no run.json, left out: `{folder}` (a run from before run records?)")
                continue
            runs.append(read_run(folder))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    groups, notes = group_runs(runs)
    if not groups:
        sys.exit("error: no complete runs to compare:\n" + "\n".join(skipped + notes))
    print(markdown_table(groups, skipped + notes, args.baseline), end="")
    if not args.no_plot:
        written = plot_curves(groups, Path(args.plot) if args.plot else Path(args.dirs[0]) / "compare_avg_at_k.png")
        print(f"\n![held-out avg@k vs generated tokens]({written})" if written
              else "\n(no plot: no run has two evaluations; pass --eval-every N to train.py)")
