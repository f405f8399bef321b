"""The loop runs every algorithm of flags.ALGORITHMS end to end, and the house keeps its shape (imports run one way)."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train
from flags import ALGORITHMS, algorithm_class

ROOT = Path(__file__).resolve().parents[1]
# Flags that make an algorithm's own parts tiny enough for a seconds-long step; an algorithm not listed runs with its
# defaults, so a new entry of ALGORITHMS is tested here without editing this file.
TINY_FLAGS = {
    "vcppo": ["--critic-warmup-steps", "1"],
    "genac": ["--segment-tokens", "4", "--critic-max-new-tokens", "8"],
    "v05": ["--v05-n0", "2", "--v05-pad", "2", "--v05-kmax", "4"], "poise": ["--probe-bootstrap-steps", "0"],
}


def _train(tiny_model, out, *flags):
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", tiny_model, "--out", str(out), "--prompts-per-step", "2",
           "--rollouts-per-prompt", "2", "--max-new-tokens", "8", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_one_step_of_every_algorithm(algo, tiny_model, tmp_path):
    """One RL step (after the algorithm's warm-up steps) through train.main: the metrics every algorithm logs, a
    checkpoint."""
    pytest.importorskip("vllm")
    rows = _train(tiny_model, tmp_path / algo, "--algo", algo, "--steps", "1", "--no-eval", *TINY_FLAGS.get(algo, []))
    assert [r["phase"] for r in rows] == ["warmup"] * (len(rows) - 1) + ["rl"]
    assert algo != "vcppo" or len(rows) == 2  # its one warm-up step (--critic-warmup-steps 1), then RL
    last = rows[-1]
    for key in ("reward", "response_length", "policy_loss", "clip_frac", "approx_kl", "entropy", "grad_norm",
                "adv_mean", "adv_std", "zero_adv_frac", "rollouts", "generated_tokens", "time/generate", "time/score",
                "time/update", "time/sync"):
        assert key in last, key
    assert last["rollouts"] >= 4 and 0.0 <= last["reward"] <= 1.0
    own = {"ppo": "critic/value_loss", "vcppo": "critic/value_loss", "genac": "genac/critic_loss", "v05": "prior_mse",
           "poise": "probe/buffer_rows"}.get(algo)
    if own:
        assert own in last, own
    assert (tmp_path / algo / f"checkpoint-{len(rows):06d}").is_dir()


def test_a_run_with_evaluation_logs_heldout_accuracy(tiny_model, tmp_path):
    pytest.importorskip("vllm")
    rows = _train(tiny_model, tmp_path / "eval", "--steps", "2", "--eval-every", "1", "--eval-n", "4", "--eval-k", "2")
    evals = [r for r in rows if "eval/avg_at_k" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]  # before training, every step, after training
    assert all(r["eval/problems"] == 4 and 0.0 <= r["eval/avg_at_k"] <= r["eval/pass_at_k"] <= 1.0 for r in evals)


def test_algorithm_flags_belong_to_their_algorithm():
    """An algorithm's flags parse only with that algorithm; its defaults for shared flags apply only to it."""
    assert train.parse_args(["--algo", "poise"]).rollouts_per_prompt == 2
    assert train.parse_args([]).rollouts_per_prompt == 8
    assert train.parse_args(["--algo", "vcppo"]).critic_warmup_steps == 6
    assert train.parse_args(["--algo", "ppo"]).critic_warmup_steps == 0
    with pytest.raises(SystemExit):
        train.parse_args(["--algo", "grpo", "--critic-warmup-steps", "3"])
    for name in ALGORITHMS:
        cls = algorithm_class(name)
        for method in ("add_arguments", "check_arguments", "sample", "advantages", "after_update", "state_dict",
                       "load_state_dict", "save", "close"):
            assert callable(getattr(cls, method, None)), (name, method)
        assert cls.memory_parts <= {"value critic", "generative critic", "prior embedder", "hidden states"}, name


def _our_imports() -> dict[str, set[str]]:
    """Every module of the repository (top level and tools/, as "name" and "tools.name") -> the modules of ours it
    imports, at any depth of the file (imports inside functions count too)."""
    files = {p.stem: p for p in ROOT.glob("*.py")} | {f"tools.{p.stem}": p for p in (ROOT / "tools").glob("*.py")
                                                          if p.stem != "__init__"}
    imports = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        imports[name] = {m for m in found if m in files} - {name}
    return imports


def test_imports_run_one_way():
    """Layers, walked over EVERY module (a new file is checked without editing this test): entry points on top;
    research tools (tools/) below them; the algorithm files (whatever flags.ALGORITHMS names) use only the shared parts;
    the shared parts use only each other; data.py, flags.py, reward.py and trackers.py are the ground; nothing imports
    train or eval; no circle."""
    imports = _our_imports()
    entry_points, tools = {"train", "eval", "genac_stages"}, {m for m in imports if m.startswith("tools.")}
    algorithm_files = {path.rsplit(".", 1)[0] for path in ALGORITHMS.values()}
    shared_parts = {"actor", "rollout", "data", "reward", "verifier", "advantage", "checkpoint", "flags", "trackers",
                    "genac_segments", "algo_flags", "engine", "collectives", "packing", "update"}
    run_parts = {"memory", "runrecord"}  # the loop's own infrastructure: the memory plan, the run record
    unplaced = set(imports) - entry_points - tools - algorithm_files - shared_parts - run_parts
    assert not unplaced, f"modules in no layer of this test: {unplaced} (add them to a layer on purpose)"
    assert not [m for m, deps in imports.items() if deps & {"train", "eval"}]
    assert not [m for m, deps in imports.items() if m not in entry_points | tools and deps & tools]
    for algorithm_file in algorithm_files:
        assert imports[algorithm_file] <= shared_parts, (algorithm_file, imports[algorithm_file] - shared_parts)
        assert "collectives" not in imports[algorithm_file], f"{algorithm_file}: the loop hands step.all_reduce"
    for part in shared_parts - algorithm_files:
        assert imports[part] <= shared_parts, (part, imports[part] - shared_parts)
    for part in run_parts:
        assert imports[part] <= shared_parts, (part, imports[part] - shared_parts)
    assert not imports["reward"] and imports["flags"] <= {"trackers", "algo_flags"} and not imports["trackers"]
    assert not imports["algo_flags"], imports["algo_flags"]  # the ground: the algorithms' flags below flags.py
    assert not imports["data"], imports["data"]  # the problems and their prompts import none of our modules
    assert imports["verifier"] == {"reward"}  # the workers import the answer reading and nothing heavier
    assert not imports["genac_segments"], imports["genac_segments"]  # GenAC's segments: pure functions
    assert "actor" not in imports["rollout"] | imports["advantage"] and "rollout" not in imports["advantage"]
    assert not imports["engine"] and not imports["collectives"], (imports["engine"], imports["collectives"])  # leaves
    assert imports["checkpoint"] <= {"actor", "flags"} and not [m for m in shared_parts if "checkpoint" in imports[m]]
    seen, on_path = set(), []  # depth-first search for a circle

    def visit(m):
        assert m not in on_path, f"import circle: {' -> '.join(on_path[on_path.index(m):] + [m])}"
        if m not in seen:
            seen.add(m), on_path.append(m)
            for d in imports[m]:
                visit(d)
            on_path.pop()
    for m in imports:
        visit(m)


def test_resuming_a_run_that_spent_its_token_budget_trains_no_more(tiny_model, tmp_path):
    """A budget-stopped run killed after its final checkpoint (before run.json's done) resumes to nothing: no extra
    step."""
    first = _train(tiny_model, tmp_path, "--token-budget", "20", "--steps", "50", "--no-eval")
    steps = [r["step"] for r in first if "reward" in r]
    assert steps[-1] < 50 and first[-1]["generated_tokens_total"] >= 20
    again = _train(tiny_model, tmp_path, "--token-budget", "20", "--steps", "50", "--no-eval", "--resume")
    assert [r["step"] for r in again if "reward" in r] == steps
