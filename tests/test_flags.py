"""The engine flags' bounds (flags.add_engine_arguments), checked as train.py checks them: before any heavy import,
exit status 2 and one line naming the flag. A bound moved (`--engine-max-num-seqs` from >= 1 to >= 0) passed every
other test: vLLM would fail minutes later, or plan memory for zero sequences."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import flags

ROOT = Path(__file__).resolve().parents[1]
OUT_OF_RANGE = [  # (flag, value, the message after "argument FLAG: ")
    ("--engine-max-num-seqs", "0", "expected an integer >= 1, got '0'"),
    ("--engine-max-num-seqs", "-3", "expected an integer >= 1, got '-3'"),
    ("--engine-max-num-seqs", "1.5", "expected an integer >= 1, got '1.5'"),
    ("--engine-max-num-batched-tokens", "0", "expected an integer >= 1, got '0'"),
    ("--gpu-memory-utilization", "0", "expected a finite number > 0 and <= 1, got '0'"),
    ("--gpu-memory-utilization", "1.5", "expected a finite number > 0 and <= 1, got '1.5'"),
    ("--gpu-memory-utilization", "nan", "expected a finite number > 0 and <= 1, got 'nan'"),
    ("--margin-gb", "-1", "expected a finite number >= 0, got '-1'"),
    ("--margin-gb", "inf", "expected a finite number >= 0, got 'inf'"),
]
EDGES = [  # (flag, value, parsed): the smallest/largest values each bound lets through
    ("--engine-max-num-seqs", "1", 1), ("--engine-max-num-batched-tokens", "1", 1),
    ("--gpu-memory-utilization", "1", 1.0), ("--gpu-memory-utilization", "0.001", 0.001), ("--margin-gb", "0", 0.0),
]


@pytest.mark.parametrize("flag,value,message", OUT_OF_RANGE)
def test_engine_flag_out_of_range_stops_early_with_one_line(flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        flags.check_run_arguments_early([flag, value], prog="train.py")
    assert e.value.code == 2 and capsys.readouterr().err == f"train.py: error: argument {flag}: {message}\n"


@pytest.mark.parametrize("flag,value,parsed", EDGES)
def test_engine_flag_edge_values_are_accepted(flag, value, parsed):
    flags.check_run_arguments_early([flag, value], prog="train.py")  # returns: no exit
    parser = argparse.ArgumentParser(exit_on_error=False)
    flags.add_engine_arguments(parser)
    assert vars(parser.parse_args([flag, value]))[flag[2:].replace("-", "_")] == parsed


@pytest.mark.parametrize("flag,value,message", [OUT_OF_RANGE[0], OUT_OF_RANGE[3], OUT_OF_RANGE[4], OUT_OF_RANGE[5],
                                                OUT_OF_RANGE[7]])
def test_train_py_stops_on_a_bad_engine_flag_before_loading_anything(flag, value, message, tmp_path):
    """As a user runs it: one line on stderr, status 2, nothing on stdout, no run folder. (Were the value let through,
    the run is a short one in tmp_path, and the test fails rather than trains.)"""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), flag, value, "--out", str(out), "--steps", "0", "--no-eval",
           "--engine", "hf"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (p.returncode, p.stdout, p.stderr) == (2, "", f"train.py: error: argument {flag}: {message}\n")
    assert not out.exists()
