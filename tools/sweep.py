"""A sweep: algorithms × seeds (× any flag's values) on one task at an equal generated-token budget.

    python -m tools.sweep --algos grpo rloo ppo v05 poise --seeds 0 1 2 --token-budget 100000 --out runs/sweep \
        -- --eval-every 5 --eval-n 100                      # after --: flags every run gets
    python -m tools.sweep ... --grid lr=1e-6,3e-6 --grid no-std=on,off      # × every combination (on/off: a switch)
    python -m tools.sweep ... --nproc-per-node 8                  # each run as torchrun --standalone --nproc_per_node 8
    python -m tools.sweep ... --dry-run                           # the plan and each run's command
                                                                  # (to submit as separate jobs)
    python eval.py compare runs/sweep                       # the table and the plot

Runs go one after another, seed by seed (all algorithms of seed 0 first: paired comparisons are possible early),
each `python train.py` into OUT/<algo>-seed<S>[-<flag>=<value>...] with its output in train.log there. A run is
complete when its run.json says done (train.py marks it after the final evaluation and checkpoint): skipped.
A folder without that is interrupted: rerun with --resume from its newest checkpoint, or started over when it
has none. So killing the sweep and starting the same command again finishes the grid. Unless given after --,
runs get --steps 100000 (the token budget, not the step count, ends every run), --save-every 10 and
--keep-checkpoints 1 (a finished run keeps only its final checkpoint: disk). A folder recorded with other flags
than the sweep would pass now is an error, never resumed.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import runrecord
from tools.compare import read_run
from flags import ALGORITHMS

ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py
OWNED = ("--algo", "--seed", "--out", "--resume", "--token-budget")  # the sweep sets these itself
DEFAULTS = {"--steps": "100000", "--save-every": "10", "--keep-checkpoints": "1"}


@dataclass
class PlannedRun:
    label: str  # "poise seed 1 lr=3e-6"
    folder: Path
    flags: list  # train.py flags, without --out and --resume
    state: str  # "complete" | "interrupted" | "new"
    resume_step: int | None = None  # the newest checkpoint's step of an interrupted run


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """["lr=1e-6,3e-6"] -> [("lr", ["1e-6", "3e-6"])]."""
    grid = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().lstrip("-")
        if not sep or not name or not all(values.split(",")):
            raise ValueError(f"--grid {spec!r}: expected FLAG=V1,V2,... e.g. lr=1e-6,3e-6")
        grid.append((name, values.split(",")))
    return grid


def flag_args(name: str, value: str, switch: bool) -> list[str]:
    """A grid value as train.py flags: on/off values of a switch add the flag or leave it out."""
    return ([f"--{name}"] if value == "on" else []) if switch else [f"--{name}", value]


def newest_checkpoint_step(folder: Path) -> int | None:
    """The step of the newest complete checkpoint: checkpoint.latest_checkpoint's rule (a folder with
    trainer_state.pt)."""
    steps = [int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if (p / "trainer_state.pt").is_file()]
    return max(steps, default=None)


def recorded_flags(record: dict) -> list[str]:
    """The flags a run was started with, without --out and --resume (which may name the same folder differently)."""
    argv, flags, i = record.get("argv", []), [], 0
    while i < len(argv):
        if argv[i] == "--out":
            i += 2
            continue
        if argv[i] != "--resume" and not argv[i].startswith("--out="):
            flags.append(argv[i])
        i += 1
    return flags


def plan(algos, seeds, token_budget: int, out: Path, grid, extra: list[str]) -> list[PlannedRun]:
    """Every run of the grid with its state; a folder recorded with other flags is an error naming both."""
    for flag in OWNED + tuple(f"--{name}" for name, _ in grid):
        if any(t == flag or t.startswith(flag + "=") for t in extra):
            raise ValueError(f"{flag} is set by the sweep (or its --grid); remove it from the flags after --")
    defaults = [t for flag, value in DEFAULTS.items() if not any(x == flag or x.startswith(flag + "=") for x in extra)
                for t in (flag, value)]
    switches = {name for name, values in grid if set(values) <= {"on", "off"}}
    runs = []
    for seed, combo, algo in itertools.product(seeds, itertools.product(*[[(n, v) for v in vs] for n, vs in grid]),
                                               algos):
        folder = out / "-".join([algo, f"seed{seed}", *(f"{n}={v}" for n, v in combo)])
        flags = ["--algo", algo, "--seed", str(seed), "--token-budget", str(token_budget), *defaults,
                 *(t for n, v in combo for t in flag_args(n, v, n in switches)), *extra]
        label = " ".join([algo, f"seed {seed}", *(f"{n}={v}" for n, v in combo)])
        record = runrecord.load(folder)
        if record is not None and recorded_flags(record) != flags:
            raise ValueError(f"{folder} was started with other flags: recorded {' '.join(recorded_flags(record))!r}, "
                             f"now {' '.join(flags)!r}; use another --out or move the folder away")
        state = "complete" if runrecord.is_complete(folder) else "interrupted" if folder.exists() else "new"
        runs.append(PlannedRun(label, folder, flags, state,
                               newest_checkpoint_step(folder) if state == "interrupted" else None))
    return runs


def command(run: PlannedRun, nproc_per_node: int) -> list[str]:
    launcher = ([sys.executable] if nproc_per_node <= 1
                else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      f"--nproc_per_node={nproc_per_node}"])
    # no checkpoint yet: a fresh start (clears metrics.jsonl)
    resume = ["--resume"] if run.resume_step is not None else []
    return launcher + [str(ROOT / "train.py"), *run.flags, "--out", str(run.folder)] + resume


def _die_with_parent() -> None:
    """Linux: the run gets SIGTERM when the sweep dies, even by SIGKILL (no orphan keeps writing into its folder)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def outcome(folder: Path) -> str:
    try:
        final = read_run(folder).final
    except (FileNotFoundError, ValueError) as e:  # e.g. its metrics.jsonl is gone
        return f", but {e}"
    return (f", avg@{final['k']} {final['avg']:.3f}, pass@{final['k']} {final['pass']:.3f}" if final
            else ", no final evaluation")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", nargs="+", required=True, choices=tuple(ALGORITHMS), help="train.py --algo values")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--token-budget", type=int, required=True,
                    help="generated tokens per run (train.py --token-budget)")
    ap.add_argument("--out", required=True, help="the sweep's folder: one run folder per grid point")
    ap.add_argument("--grid", action="append", default=[],
                    help="FLAG=V1,V2,...: also vary a train.py flag (repeatable)")
    ap.add_argument("--nproc-per-node", type=int, default=1,
                    help="> 1: each run through torchrun with this many processes")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    ap.add_argument("--drop-checkpoints", action="store_true",
                    help="delete a run's checkpoints once it is complete (its metrics and run.json stay): "
                    "a grid of many runs on a small disk")
    args = ap.parse_args(ours)
    if args.token_budget < 1:
        ap.error("--token-budget must be >= 1: a sweep compares at an equal generated-token budget")
    try:
        runs = plan(args.algos, args.seeds, args.token_budget, Path(args.out), parse_grid(args.grid), extra)
    except ValueError as e:
        ap.error(str(e))
    failed = []
    for i, run in enumerate(runs, 1):
        head = f"[sweep {i}/{len(runs)}] {run.label}: "
        if args.dry_run:
            print(f"{head}{run.state}\n    {' '.join(command(run, args.nproc_per_node))}")
            continue
        if run.state == "complete":
            print(f"{head}skipped (complete){outcome(run.folder)}", flush=True)
            continue
        print(head + (f"resuming from step {run.resume_step} ... " if run.resume_step
                      else "interrupted before a checkpoint, starting over ... " if run.state == "interrupted"
                      else "running ... "), end="", flush=True)
        run.folder.mkdir(parents=True, exist_ok=True)
        start = time.time()
        with open(run.folder / "train.log", "a") as log:
            log.write(f"\n[sweep] {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command(run, args.nproc_per_node))}\n")
            log.flush()
            proc = subprocess.Popen(command(run, args.nproc_per_node), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent)
            try:
                code = proc.wait()
            except KeyboardInterrupt:  # Ctrl-C reached the run too (same process group): let it end, then stop
                proc.wait()
                print(f"interrupted\n[sweep] stopped; the same command resumes {run.folder}", flush=True)
                return 130
        if code == 0 and runrecord.is_complete(run.folder):
            print(f"done in {time.time() - start:.0f} s{outcome(run.folder)}", flush=True)
            if args.drop_checkpoints:
                for folder in run.folder.glob("checkpoint-*"):
                    shutil.rmtree(folder, ignore_errors=True)
        else:
            failed.append(run.folder)
            print(f"failed (exit code {code}) after {time.time() - start:.0f} s; see {run.folder / 'train.log'}",
                  flush=True)
    if failed:
        print(f"[sweep] {len(failed)} of {len(runs)} runs failed: {', '.join(map(str, failed))}", flush=True)
    elif not args.dry_run:
        print(f"[sweep] all {len(runs)} runs complete; compare them: python eval.py compare {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
