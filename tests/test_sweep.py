"""tools/sweep.py: the plan (complete runs skipped, interrupted ones resumed) on temp folders, and one real sweep killed
and restarted."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools import sweep

ROOT = Path(__file__).resolve().parents[1]


def record(folder, flags, done):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"args": {}, "argv": [*flags, "--out", str(folder)], "resumes": [],
                                                 "done": {"step": 3} if done else None}))


def test_plan_order_names_and_flags(tmp_path):
    runs = sweep.plan(["grpo", "ppo"], [0, 1], 5000, tmp_path, sweep.parse_grid(["lr=1e-6,3e-6"]),
                      ["--eval-every", "5"])
    assert [r.folder.name for r in runs[:4]] == ["grpo-seed0-lr=1e-6", "ppo-seed0-lr=1e-6", "grpo-seed0-lr=3e-6",
                                                 "ppo-seed0-lr=3e-6"]
    assert len(runs) == 8 and {r.state for r in runs} == {"new"}  # seed by seed: all of seed 0 first
    assert runs[0].flags == ["--algo", "grpo", "--seed", "0", "--token-budget", "5000", "--steps", "100000",
                             "--save-every", "10", "--keep-checkpoints", "1", "--lr", "1e-6", "--eval-every", "5"]
    assert runs[0].label == "grpo seed 0 lr=1e-6"
    cmd = sweep.command(runs[0], 1)
    assert cmd[1:3] == [str(ROOT / "train.py"), "--algo"] and cmd[-2:] == ["--out", str(runs[0].folder)]
    assert sweep.command(runs[0], 4)[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]


def test_complete_skipped_interrupted_resumed(tmp_path):
    fresh = sweep.plan(["grpo"], [0, 1, 2], 100, tmp_path, [], ["--save-every", "2"])  # --save-every given: no default
    assert fresh[0].flags == ["--algo", "grpo", "--seed", "0", "--token-budget", "100", "--steps", "100000",
                              "--keep-checkpoints", "1", "--save-every", "2"]
    record(tmp_path / "grpo-seed0", fresh[0].flags, done=True)
    record(tmp_path / "grpo-seed1", fresh[1].flags, done=False)
    for step in (4, 8):
        (tmp_path / "grpo-seed1" / f"checkpoint-{step:06d}").mkdir()
        (tmp_path / "grpo-seed1" / f"checkpoint-{step:06d}" / "trainer_state.pt").write_bytes(b"x")
    # no trainer_state.pt: not a checkpoint (a save was cut short)
    (tmp_path / "grpo-seed1" / "checkpoint-000010").mkdir()
    (tmp_path / "grpo-seed2").mkdir()  # killed before its first checkpoint
    runs = sweep.plan(["grpo"], [0, 1, 2], 100, tmp_path, [], ["--save-every", "2"])
    assert [(r.state, r.resume_step) for r in runs] == [("complete", None), ("interrupted", 8), ("interrupted", None)]
    assert sweep.command(runs[1], 1)[-1] == "--resume"
    assert "--resume" not in sweep.command(runs[2], 1)  # no checkpoint: a fresh start, which clears its metrics.jsonl


def test_plan_refuses_mixed_flags(tmp_path):
    record(tmp_path / "grpo-seed0", ["--algo", "grpo", "--seed", "0", "--token-budget", "999"], done=True)
    with pytest.raises(ValueError, match="grpo-seed0 was started with other flags"):
        sweep.plan(["grpo"], [0], 100, tmp_path, [], [])
    with pytest.raises(ValueError, match="--seed is set by the sweep"):
        sweep.plan(["grpo"], [0], 100, tmp_path / "other", [], ["--seed=3"])
    with pytest.raises(ValueError, match="--lr is set by the sweep"):
        sweep.plan(["grpo"], [0], 100, tmp_path / "other", sweep.parse_grid(["lr=1,2"]), ["--lr", "3"])
    with pytest.raises(ValueError, match="expected FLAG=V1,V2"):
        sweep.parse_grid(["lr"])


def test_a_switch_in_the_grid(tmp_path):
    runs = sweep.plan(["grpo"], [0], 100, tmp_path, sweep.parse_grid(["--no-std=on,off"]), [])
    assert [r.folder.name for r in runs] == ["grpo-seed0-no-std=on", "grpo-seed0-no-std=off"]
    assert "--no-std" in runs[0].flags and "--no-std" not in runs[1].flags


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "\nState:\tZ" not in status.read_text()


def test_a_killed_sweep_finishes_the_grid_without_redoing_complete_runs(tiny_model, tmp_path):
    """Two tiny runs of 7 steps; the sweep is SIGKILLed once the second has a checkpoint; the same command skips
    the first and resumes the second from its checkpoint."""
    pytest.importorskip("vllm")
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "tools.sweep", "--algos", "grpo", "--seeds", "0", "1", "--token-budget", "200",
           "--out", str(out), "--", "--model", tiny_model, "--prompts-per-step", "2", "--rollouts-per-prompt", "2",
           "--max-new-tokens", "8", "--eval-n", "4", "--eval-k", "2", "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    second_run, deadline = out / "grpo-seed1", time.time() + 600
    while not any((second_run / f"checkpoint-{s:06d}" / "trainer_state.pt").is_file() for s in (1, 2)):
        assert first.poll() is None and time.time() < deadline, (first.stdout.read() if first.poll() is not None
                                                                  else "timeout")
        time.sleep(0.1)
    children = _children(first.pid)
    first.kill()  # SIGKILL: no cleanup in the sweep; its run must still end (PR_SET_PDEATHSIG)
    first.wait()
    assert children and not json.loads((second_run / "run.json").read_text())["done"]
    while any(_alive(c) for c in children):
        assert time.time() < deadline, "the run outlived the killed sweep"
        time.sleep(0.2)
    started = json.loads((out / "grpo-seed0" / "run.json").read_text())
    assert started["done"]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[sweep 1/2] grpo seed 0: skipped (complete)" in again.stdout
    assert "[sweep 2/2] grpo seed 1: resuming from step" in again.stdout and "done in" in again.stdout
    assert json.loads((out / "grpo-seed0" / "run.json").read_text()) == started  # not rerun
    assert (out / "grpo-seed0" / "train.log").read_text().count("[sweep]") == 1
    resumed = json.loads((second_run / "run.json").read_text())
    assert resumed["done"] and len(resumed["resumes"]) == 1
    steps = [json.loads(line)["step"] for line in (second_run / "metrics.jsonl").read_text().splitlines()
             if "time/step" in json.loads(line)]
    assert steps == list(range(1, len(steps) + 1)) and resumed["done"]["generated_tokens"] >= 200
