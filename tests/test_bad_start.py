"""A bad start stops with ONE line and changes nothing (issue 36): every input train.py and eval.py can check is
checked before the first byte is written. A finished run's folder is checksummed (every file, byte for byte) before
and after each bad start aimed at it; the same start aimed at a new folder leaves no folder. Argument errors stop
before torch is imported (the < 2 s budget; tests/test_bad_input.py has the exact lines of the shared flags)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RUN = "runs/a"  # the finished GRPO run every start below is aimed at


def checksum(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> its sha256, every sub-folder -> "dir": the whole tree, byte for byte."""
    tree = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        tree[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


def finished_run(folder: Path, algo: str = "grpo", record: bool = True) -> None:
    """The files a finished train.py run leaves (runrecord.py, checkpoint.py), written without training: run.json
    marked done, metrics.jsonl, a final checkpoint (DCP shards and .metadata, trainer_state.pt, config, weights)."""
    import train
    args = train.parse_args(["--algo", algo, "--out", str(folder)])
    ckpt = folder / "checkpoint-000002"
    (ckpt / "sharded").mkdir(parents=True)
    (ckpt / "sharded" / ".metadata").write_bytes(b"dcp metadata")
    (ckpt / "sharded" / "__0_0.distcp").write_bytes(bytes(range(256)))
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048}))
    (ckpt / "model.safetensors").write_bytes(b"weights")
    torch.save({"step": 2, "stream": {"epoch": 0, "position": 8}, "algorithm": {}, "generated_tokens": 96,
                "world": 1}, ckpt / "trainer_state.pt")
    (folder / "metrics.jsonl").write_text('{"step": 0, "eval/avg_at_k": 0.25}\n{"step": 1, "reward": 0.5}\n'
                                          '{"step": 2, "reward": 0.75}\n{"step": 2, "eval/avg_at_k": 0.5}\n')
    if record:
        done = {"time": "2026-12-07T06:00:00+00:00", "step": 2, "generated_tokens": 96}
        (folder / "run.json").write_text(json.dumps({"args": vars(args), "argv": ["--out", str(folder)],
                                                     "started": "2026-12-07T05:50:00+00:00", "resumes": [],
                                                     "done": done}, indent=1) + "\n")


@pytest.fixture
def work(tmp_path) -> Path:
    """A working folder holding the finished run and the bad files the starts name."""
    finished_run(tmp_path / RUN)
    finished_run(tmp_path / "runs/norecord", record=False)  # a GRPO checkpoint without its run.json
    (tmp_path / "data_folder").mkdir()
    row = lambda problem, answer="2": json.dumps({"problem": problem, "answer": answer}) + "\n"  # noqa: E731
    (tmp_path / "long.jsonl").write_text(row("What is 1 + 1? " * 13334))  # 200,010 characters
    (tmp_path / "latin1.jsonl").write_bytes(row("What is 1 + 1?").encode() + b'{"problem": "caf\xe9", "answer": 1}\n')
    (tmp_path / "noanswer.jsonl").write_text(row("What is 1 + 1?") + json.dumps({"problem": "What is 2 + 2?"}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    broken = tmp_path / "broken" / "trackio"  # a package that is found but does not import
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("cannot import name \'Run\' (a broken install)")\n')
    return tmp_path


def start(cwd: Path, argv: list[str], script: str = "train.py", env: dict | None = None):
    """-> (status, stderr lines, modules imported): the script under -X importtime, whose lines are set apart."""
    p = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / script), *argv], cwd=cwd, capture_output=True,
                       text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})})
    times = [line for line in p.stderr.splitlines() if line.startswith("import time:")]
    lines = [line for line in p.stderr.splitlines() if line.strip() and not line.startswith("import time:")]
    return p.returncode, lines, {line.rsplit("|", 1)[-1].strip() for line in times}


# (id, argv with {run} for the folder aimed at and {tiny} for the tiny model, what the line must name, kind):
# kind "flag": status 2, before torch; "input": status 1, before torch; "late": status 1, needs the tokenizer or torch.
# "fresh": the same start aimed at runs/new must create nothing (False where that start would be a good one).
ISSUE = [  # the issue's table
    ("resume-another-algorithm", ["--out", "{run}", "--algo", "ppo", "--resume"], "--algo grpo", "input", False),
    ("micro-batch-size-0", ["--out", "{run}", "--micro-batch-size", "0"], "--micro-batch-size", "flag", True),
    ("broken-tracker", ["--out", "{run}", "--report-to", "trackio"], "--report-to trackio", "input", True),
    ("read-only-out", ["--out", "{run}"], "--out", "input", True),
    ("data-is-a-folder", ["--out", "{run}", "--data", "data_folder"], "--data: data_folder is a folder", "input",
     True),
    ("eval-data-missing", ["--out", "{run}", "--eval-data", "missing.jsonl"], "--eval-data", "input", True),
    ("200k-character-prompt", ["--out", "{run}", "--model", "{tiny}", "--data", "long.jsonl", "--no-eval"],
     "--max-prompt-tokens", "late", True),
    ("grpo-one-rollout", ["--out", "{run}", "--rollouts-per-prompt", "1"], "--rollouts-per-prompt", "flag", True),
    ("v05-n0-over-kmax", ["--out", "{run}", "--algo", "v05", "--v05-n0", "20"], "--v05-n0 20", "flag", True),
    ("another-algorithms-flag", ["--out", "{run}", "--algo", "grpo", "--critic-warmup-steps", "3"],
     "--critic-warmup-steps is a flag of --algo ppo, vcppo", "flag", True),
]
OWN = [  # ours
    ("algorithm-flag-out-of-range", ["--out", "{run}", "--algo", "ppo", "--lam", "2"], "argument --lam", "flag", True),
    ("v05-cost-zero", ["--out", "{run}", "--algo", "v05", "--v05-cost", "0"], "argument --v05-cost", "flag", True),
    ("steps-not-a-number", ["--out", "{run}", "--steps", "ten"], "argument --steps", "flag", True),
    ("arithmetic-levels-not-numbers", ["--out", "{run}", "--data", "arithmetic:1,x"], "--data: 'arithmetic:1,x'",
     "input", True),
    ("data-not-utf8", ["--out", "{run}", "--data", "latin1.jsonl"], "--data: latin1.jsonl:2: not UTF-8", "input",
     True),
    ("data-row-without-answer", ["--out", "{run}", "--data", "noanswer.jsonl"],
     "noanswer.jsonl:2: missing field 'answer'", "input", True),
    ("eval-data-empty", ["--out", "{run}", "--eval-data", "empty.jsonl"], "--eval-data: empty.jsonl: no rows",
     "input", True),
    ("out-is-a-file", ["--out", "{run}/run.json"], "is a file, not a folder", "input", False),
    ("model-missing", ["--out", "{run}", "--model", "no/such/model"], "--model no/such/model: no such folder",
     "input", True),
    ("critic-missing", ["--out", "{run}", "--algo", "ppo", "--critic", "/no/such/critic"],
     "--critic-model /no/such/critic: no such folder", "input", True),
    ("prior-embedder-missing", ["--out", "{run}", "--algo", "v05", "--prior-embedder", "/no/such/embedder"],
     "--prior-embedder /no/such/embedder", "input", True),
    ("resume-another-model", ["--out", "{run}", "--model", "{tiny}", "--resume"], "--model", "input", False),
    ("context-over-the-model", ["--out", "{run}", "--model", "{tiny}", "--max-new-tokens", "4000"],
     "over the 2048 positions", "input", True),
    ("resume-another-algorithms-checkpoint", ["--out", "runs/norecord", "--algo", "ppo", "--resume"],
     "critic/sharded/.metadata", "late", False),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=[pytest.mark.slow] if c[3] == "late" else [])
                                  for c in ISSUE + OWN])
def test_a_bad_start_stops_with_one_line_and_changes_nothing(case, work, request):
    name, argv, names, kind, fresh = case
    tiny = request.getfixturevalue("tiny_model") if "{tiny}" in argv else None
    env = {"PYTHONPATH": str(work / "broken")} if name == "broken-tracker" else None
    for run in [RUN] + ([f"{RUN}/new" if name == "read-only-out" else "runs/new"] if fresh else []):
        before = checksum(work)
        with read_only(work / RUN, name == "read-only-out"):
            status, lines, imported = start(work, [a.replace("{run}", run).replace("{tiny}", str(tiny)) for a in argv],
                                            env=env)
        assert status == (2 if kind == "flag" else 1), (name, run, lines)
        assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and names in lines[0], (name, run, lines)
        assert kind == "late" or "torch" not in imported, name  # flags, data, folders: before the heavy imports
        assert checksum(work) == before, (name, run)  # nothing written, nothing created, anywhere in the work folder


def test_eval_baselines_names_the_policy_flag(work):
    before = checksum(work)
    status, lines, _ = start(work, ["baselines", "--policy", "runs/no-such-policy"], script="eval.py")
    assert status == 1 and lines == ["eval.py baselines: error: --policy runs/no-such-policy: no such folder; give a "
                                     "Hugging Face model folder"]
    assert checksum(work) == before


@pytest.mark.parametrize("argv,names", [(["-k", "0"], "argument -k"), (["--data", "data_folder"], "--data"),
                                        (["--model", "/no/such"], "--model /no/such"),
                                        (["--json", "no/dir/r.json"], "--json no/dir/r.json"),
                                        (["values", "--policy", "/no/such"], "--policy /no/such")])
def test_eval_stops_before_evaluating_and_before_torch(work, argv, names):
    """eval.py's own flags and files: one line, before the heavy imports (before it stopped after evaluating, for a
    --json in a folder that does not exist)."""
    status, lines, imported = start(work, argv, script="eval.py")
    assert status in (1, 2) and len(lines) == 1 and names in lines[0] and "torch" not in imported, lines


class read_only:
    """The folder read-only for the duration: immutable for root (who writes through permissions), else a-w."""

    def __init__(self, folder: Path, on: bool):
        self.folder, self.on, self.root = folder, on, os.geteuid() == 0

    def __enter__(self):
        if self.on and self.root:
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(self.folder)]).returncode:
                pytest.skip("root here cannot make a folder read-only (no chattr +i on this filesystem)")
        elif self.on:
            self.folder.chmod(0o555)

    def __exit__(self, *exc):
        if self.on and self.root:
            subprocess.run(["chattr", "-i", str(self.folder)], check=True)
        elif self.on:
            self.folder.chmod(0o755)


def test_every_algorithm_takes_its_flags_from_its_torch_free_class():
    """train.py parses and checks an algorithm's own flags without importing it (no torch: argument errors in < 2 s)
    for every algorithm with a flags class in algo_flags.py (the project's seven all have one; a user's algorithm may
    skip it: README "Add an algorithm" step 5); the algorithm class inherits that flags class unchanged, so tools
    calling GRPO.add_arguments get the same."""
    from algo_flags import ALGORITHM_FLAGS
    from flags import ALGORITHMS, algorithm_class
    assert {"grpo", "rloo", "ppo", "vcppo", "genac", "v05", "poise"} <= set(ALGORITHM_FLAGS)
    code = ("import sys, flags, algo_flags; [flags.parse_train_args(['--algo', a]) for a in flags.ALGORITHMS "
            "if a in algo_flags.ALGORITHM_FLAGS]; "
            "print(sorted(m for m in ('torch', 'advantage', 'critic', 'genac', 'prior', 'probe') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", (p.stdout, p.stderr[-2000:])
    for name in set(ALGORITHMS) & set(ALGORITHM_FLAGS):
        cls, flags = algorithm_class(name), ALGORITHM_FLAGS[name]
        assert issubclass(cls, flags) and cls.add_arguments is flags.add_arguments, name
        assert cls.check_arguments is flags.check_arguments, name


def test_a_resume_names_a_zero_valued_flag_as_given(tmp_path):
    """A recorded --probe-layer 0 is a value, not an unset flag: the refusal says to resume with --probe-layer 0."""
    import runrecord
    import train
    folder = tmp_path / "poise"
    folder.mkdir()
    args = train.parse_args(["--algo", "poise", "--probe-layer", "0", "--out", str(folder)])
    (folder / "run.json").write_text(json.dumps({"args": vars(args), "argv": [], "resumes": []}))
    other = train.parse_args(["--algo", "poise", "--probe-layer", "1", "--resume"])
    assert runrecord.resume_error(folder, other, ("probe_layer",)) == (
        f"--resume: {folder} holds a run with --probe-layer 0 (its run.json), not with --probe-layer 1; resume it "
        "with --probe-layer 0, or start this run in another --out")
    assert runrecord.resume_error(folder, train.parse_args(["--algo", "poise", "--probe-layer", "0"]),
                                  ("probe_layer",)) is None


def test_a_resume_keeps_the_flags_its_checkpoint_depends_on(tmp_path):
    """runrecord.resume_error reads run.json only: another algorithm, model or critic is refused naming the flag and
    the value to resume with; the same run (a path spelled differently included) continues."""
    import runrecord
    import train
    finished_run(tmp_path / "ppo", algo="ppo")
    keep = ("algo", "model", "critic_model")
    same = train.parse_args(["--algo", "ppo", "--resume"])
    assert runrecord.resume_error(tmp_path / "ppo", same, keep) is None
    message = runrecord.resume_error(tmp_path / "ppo", train.parse_args(["--algo", "ppo", "--critic", "c"]), keep)
    assert message == (f"--resume: {tmp_path / 'ppo'} holds a run without --critic-model (its run.json), not with "
                       "--critic-model c; resume it without --critic-model, or start this run in another --out")
    assert "resume it with --algo ppo," in runrecord.resume_error(tmp_path / "ppo", train.parse_args([]), keep)
    moved = train.parse_args(["--algo", "ppo", "--resume", "--critic", str(tmp_path / "ppo")])
    record = json.loads((tmp_path / "ppo" / "run.json").read_text())
    record["args"]["critic_model"] = f"{tmp_path}/./ppo"  # the same folder, spelled differently
    (tmp_path / "ppo" / "run.json").write_text(json.dumps(record))
    assert runrecord.resume_error(tmp_path / "ppo", moved, keep) is None
    (tmp_path / "ppo" / "run.json").write_text("{not json")
    assert "cannot be read" in runrecord.resume_error(tmp_path / "ppo", same, keep)
    assert runrecord.resume_error(tmp_path / "none", same, keep) is None  # no record: the checkpoint is checked later
