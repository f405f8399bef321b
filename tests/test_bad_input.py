"""Bad input gets a clear message naming the problem, not a traceback from deep inside."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_unknown_algo():
    p = run("--algo", "ppo2")
    assert p.returncode == 2 and "unknown --algo 'ppo2'" in p.stderr and "Traceback" not in p.stderr


def test_missing_model_path():
    p = run("--model", "/no/such/model")
    assert p.returncode == 1 and "--model /no/such/model: no such folder" in p.stderr and "Traceback" not in p.stderr


def test_model_folder_without_config(tmp_path):
    p = run("--model", str(tmp_path))
    assert p.returncode == 1 and "has no config.json" in p.stderr


def test_missing_data_file():
    p = run("--data", "nope.jsonl")
    assert p.returncode == 1 and "data file not found: nope.jsonl" in p.stderr


def test_malformed_jsonl_row_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "oops"}\n')
    p = run("--data", str(f))
    assert p.returncode == 1 and f"{f}:2: missing field 'answer'" in p.stderr and "Traceback" not in p.stderr


def test_prompt_over_the_limit(tiny_model):
    p = run("--model", tiny_model, "--max-prompt-tokens", "10", "--engine", "hf")
    assert p.returncode == 1 and "over --max-prompt-tokens 10" in p.stderr and "Traceback" not in p.stderr


def test_group_size_one_rejected():
    p = run("--rollouts-per-prompt", "1")
    assert p.returncode == 2 and "--rollouts-per-prompt must be >= 2" in p.stderr


def test_missing_prior_embedder(tiny_model):
    p = run("--algo", "v05", "--model", tiny_model, "--engine", "hf", "--prior-embedder", "/no/such/embedder",
            "--no-eval")
    assert (p.returncode == 1 and "--prior-embedder /no/such/embedder: no such folder" in p.stderr
            and "Traceback" not in p.stderr)


def test_bad_numbers_fail_when_parsed_not_after_loading():
    for flags, message in ((("--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
                           (("--temperature", "-1"), "--temperature must be > 0"),
                           (("--algo", "v05", "--v05-n0", "20", "--v05-kmax", "16"), "--v05-n0")):
        p = run(*flags)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, (flags, p.stderr[-500:])


@pytest.mark.slow  # starts processes that import torch / train.py
def test_damaged_checkpoint_is_named_with_the_older_one_that_works(tmp_path):
    for step, content in ((1, b"an older checkpoint's state"), (2, b"\x00" * 64)):
        (tmp_path / f"checkpoint-00000{step}").mkdir()
        (tmp_path / f"checkpoint-00000{step}" / "trainer_state.pt").write_bytes(content)
    p = run("--out", str(tmp_path), "--resume")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "checkpoint-000002/trainer_state.pt is damaged" in p.stderr and "resume from checkpoint-000001" in p.stderr


def test_a_file_has_no_heldout_split_and_train_says_what_is_held_out(tmp_path):
    from data import DataError, load_problems
    f = tmp_path / "d.jsonl"
    f.write_text("".join(f'{{"problem": "What is {a} + 1?", "answer": "{a + 1}"}}\n' for a in range(5)))
    with pytest.raises(DataError, match="no held-out split"):
        load_problems(str(f), "heldout")  # before: the training rows came back
    assert len(load_problems(str(f), "benchmark")) == 5 == len(load_problems(str(f), "train"))
    train, held = load_problems("arithmetic", "train"), load_problems("arithmetic", "heldout")
    assert not {p.problem for p in train} & {p.problem for p in held}


BAD_FLAGS = [  # (flags, the one line train.py prints), each stopped by the parser before torch is imported
    (("--lr", "nan"), "argument --lr: expected a finite number > 0, got 'nan'"),
    (("--lr", "-0.001"), "argument --lr: expected a finite number > 0, got '-0.001'"),
    (("--token-budget", "-5"), "argument --token-budget: expected an integer >= 0, got '-5'"),
    (("--clip-ratio-c", "1"), "argument --clip-ratio-c: expected a finite number > 1, got '1'"),
    (("--clip-low", "1.5"), "argument --clip-low: expected a finite number > 0 and <= 1, got '1.5'"),
    (("--verifier-timeout", "inf"), "argument --verifier-timeout: expected a finite number > 0, got 'inf'"),
    (("--weight-decay", "nan"), "argument --weight-decay: expected a finite number >= 0, got 'nan'"),
    (("--steps", "-1"), "argument --steps: expected an integer >= 0, got '-1'"),
    (("--gpu-memory-utilization", "0"),
     "argument --gpu-memory-utilization: expected a finite number > 0 and <= 1, got '0'"),
    (("--temperature", "nan"), "--temperature must be > 0"),
    (("--algo", "nope"),
     "argument --algo: unknown --algo 'nope'; choose one of grpo, rloo, ppo, vcppo, genac, v05, poise"),
]


@pytest.mark.slow  # starts processes that import torch / train.py
def test_bad_flags_stop_at_parse_time_before_the_heavy_imports():
    for flags, message in BAD_FLAGS:
        p = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "train.py"), *flags], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        timings = [line for line in p.stderr.splitlines() if line.startswith("import time:")]
        errors = [line for line in p.stderr.splitlines() if not line.startswith("import time:")]
        imported = {line.rsplit("|", 1)[-1].strip() for line in timings}
        assert p.returncode == 2 and errors == [f"train.py: error: {message}"], (flags, errors)  # one line, no usage
        assert "torch" not in imported and "flags" in imported, flags


def test_flags_that_are_fine_still_parse():
    import train
    args = train.parse_args(["--lr", "1e-6", "--token-budget", "0", "--clip-ratio-c", "10", "--seed", "-3"])
    assert (args.lr, args.token_budget, args.clip_ratio_c, args.seed) == (1e-6, 0, 10.0, -3)


def test_a_data_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    from data import DataError, load_jsonl
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"problem": "What is 1 + 1?", "answer": "2"}\n{"problem": "caf\xe9 costs?", "answer": "3"}\n')
    with pytest.raises(DataError) as e:
        load_jsonl(str(f))
    assert str(e.value) == f"{f}:2: not UTF-8 text (byte 0xe9 at column 17); save the file as UTF-8"


def test_sweep_refuses_an_unknown_algorithm(tmp_path):
    p = subprocess.run([sys.executable, "-m", "tools.sweep", "--algos", "grpo", "nope", "--token-budget", "100",
                        "--out", str(tmp_path), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "argument --algos: invalid choice: 'nope'" in p.stderr and "[sweep" not in p.stdout
