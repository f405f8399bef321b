"""--report-to: every metrics.jsonl record, evaluation lines included, reaches TensorBoard, wandb (offline) and trackio
under the same names and steps, read back with each tracker's own reader; run.json is the run config; --resume continues
the same TensorBoard run (and the same wandb run id); a tracker whose package is missing stops at parse time (rc 2,
install line); the offline trackers open no network connection (strace)."""
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRACKERS = [t for t in ("tensorboard", "wandb", "trackio") if importlib.util.find_spec(t) is not None]


def tracker_env(tmp: Path) -> dict:
    """No W&B key or mode, tracker state under tmp: what a machine with no account sees (HF_HUB_OFFLINE: trackio
    asks the Hub who owns a stored token otherwise)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TRACKIO_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", NETRC=str(tmp / "no-netrc"), TRACKIO_DIR=str(tmp / "trackio"),
               WANDB_CONFIG_DIR=str(tmp / "wandb-config"), WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
               WANDB_DATA_DIR=str(tmp / "wandb-data"))
    return env


def train(model, out, steps, report_to, env, extra=(), prefix=()):
    cmd = [*prefix, sys.executable, str(ROOT / "train.py"), "--model", model, "--out", str(out), "--steps", str(steps),
           "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--max-new-tokens", "8", "--engine", "hf",
           "--eval-n", "2", "--eval-k", "1", "--micro-batch-size", "4", "--report-to", *report_to, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def expected_by_step(rows: list[dict]) -> dict:
    """{step: {name: value}}: metrics.jsonl merged per step (an evaluation line may share a training line's step)."""
    merged = {}
    for row in rows:
        merged.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step"})
    return merged


def tensorboard_by_step(folder: Path) -> dict:
    """{step: {tag: [values]}} from the event files, with the EventAccumulator TensorBoard's plugins read through (it
    drops the events a resumed run's purge step orphans)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    found = {}
    for tag in acc.Tags()["tensors"]:
        for event in acc.Tensors(tag):
            value = tensor_util.make_ndarray(event.tensor_proto)
            value = value.item() if value.shape == () else value.reshape(-1)[0]
            value = value.decode() if isinstance(value, bytes) else value
            found.setdefault(event.step, {}).setdefault(tag, []).append(value)
    return found


def wandb_records(path: Path):
    """The protobuf records of a .wandb file (wandb's own Record type; the file is a LevelDB-style log of 32 KiB blocks,
    each record in chunks with a 7-byte header: crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4)."""
    from wandb.proto import wandb_internal_pb2
    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # no room for a header: the rest of the block is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(path: Path) -> tuple[dict, dict]:
    """({step: {name: value}} of the history rows, the run's config) of one offline .wandb file."""
    history, config = {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    return history, config


@pytest.fixture(scope="module")
def tracked_run(tiny_model, tmp_path_factory):
    """A 2-step run with an evaluation every step, reported to every installed tracker (under strace if present)."""
    if not TRACKERS:
        pytest.skip("no tracker package installed (pip install -r requirements-trackers.txt)")
    tmp = tmp_path_factory.mktemp("trackers")
    out, trace = tmp / "run", tmp / "connect.strace"
    prefix = ["strace", "-f", "-e", "trace=connect", "-o", str(trace)] if shutil.which("strace") else []
    proc = train(tiny_model, out, 2, TRACKERS, tracker_env(tmp), ["--eval-every", "1"], prefix)
    return {"out": out, "tmp": tmp, "proc": proc, "trace": trace if prefix else None, "rows": metrics(out)}


def test_tensorboard_holds_exactly_the_metrics_jsonl_values(tracked_run):
    pytest.importorskip("tensorboard")
    rows, out = tracked_run["rows"], tracked_run["out"]
    assert [r["step"] for r in rows if "eval/avg_at_k" in r] == [0, 1, 2]
    found = tensorboard_by_step(out / "tensorboard")
    expected = expected_by_step(rows)
    assert sorted(found) == [0, 1, 2]
    for step, values in expected.items():
        for name, value in values.items():
            assert found[step][name] == [value], (step, name)  # float64 tensors: the JSON value itself, once
    assert set(found[1]) == set(expected[1])
    config = json.loads(found[0]["run.json"][0].strip("`\n"))  # run.json as the run's config, at the start step
    record = json.loads((out / "run.json").read_text())
    assert config["args"]["report_to"] == TRACKERS and config["git"] == record["git"]
    assert config["model"] == record["model"]


def test_wandb_offline_history_holds_the_metrics_jsonl_values(tracked_run):
    pytest.importorskip("wandb")
    out = tracked_run["out"]
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1  # offline: no key, no WANDB_MODE
    history, config = wandb_history(files[0])
    assert history == expected_by_step(tracked_run["rows"])
    record = json.loads((out / "run.json").read_text())
    assert config["args"] == record["args"] and config["versions"] == record["versions"]
    assert f"wandb sync {out / 'wandb'}/offline-run-*-" in tracked_run["proc"].stdout


def test_trackio_local_database_holds_the_metrics_jsonl_values(tracked_run):
    pytest.importorskip("trackio")
    tmp = tracked_run["tmp"]
    read = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "name = S.get_runs('valuerl')[0]; "
            "print(json.dumps([S.get_logs('valuerl', name), S.get_run_config('valuerl', name)], default=str))")
    proc = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, timeout=120,
                          env=tracker_env(tmp))
    assert proc.returncode == 0, proc.stderr[-2000:]
    logs, config = json.loads(proc.stdout.splitlines()[-1])
    found = {}
    for log in logs:
        found.setdefault(log["step"], {}).update({k: v for k, v in log.items() if k not in ("step", "timestamp")})
    assert found == expected_by_step(tracked_run["rows"])
    record = json.loads((tracked_run["out"] / "run.json").read_text())
    assert config["args"] == record["args"] and config["data"] == record["data"]


def test_offline_trackers_open_no_network_connection(tracked_run):
    """Every connect() of the run and its children (wandb-core included) goes to a local socket or loopback."""
    if tracked_run["trace"] is None:
        pytest.skip("strace is not installed")
    connects = [line for line in tracked_run["trace"].read_text().splitlines() if "connect(" in line]
    remote = [line for line in connects if ("AF_INET" in line and "127.0.0.1" not in line and "::1" not in line)]
    assert remote == []
    if "wandb" in TRACKERS:
        assert any("AF_UNIX" in line and "wandb" in line for line in connects)  # the trace saw wandb-core's socket


def test_resume_continues_the_same_tensorboard_run(tiny_model, tmp_path):
    """2 steps, a killed run's stray step-3 event, then --resume to 3 steps: one log folder holding steps 0..3 with the
    resumed values (the stray event purged), equal to metrics.jsonl; wandb keeps the run id in a second offline file."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter
    out, env = tmp_path / "run", tracker_env(tmp_path)
    report = [t for t in ("tensorboard", "wandb") if t in TRACKERS]
    train(tiny_model, out, 2, report, env)
    with SummaryWriter(str(out / "tensorboard")) as stray:  # as if killed after logging step 3, before its checkpoint
        stray.add_scalar("reward", 99.0, 3, new_style=True, double_precision=True)
    proc = train(tiny_model, out, 3, report, env, ["--resume"])
    assert "[resume] from" in proc.stderr and "step 2" in proc.stderr
    rows = metrics(out)
    assert sorted({r["step"] for r in rows}) == [0, 1, 2, 3]
    found = tensorboard_by_step(out / "tensorboard")
    assert [p.name for p in out.iterdir() if p.name.startswith("tensorboard")] == ["tensorboard"]
    for step, values in expected_by_step(rows).items():
        for name, value in values.items():
            assert found[step][name] == [value], (step, name)
    assert found[3]["reward"] != [99.0]
    if "wandb" in report:
        files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 2 and files[0].name == files[1].name  # the same run id, continued
        assert sorted(wandb_history(files[1])[0]) == [3]


@pytest.mark.slow  # starts processes that import torch / train.py
def test_a_missing_tracker_package_stops_at_parse_time(tmp_path):
    """wandb and trackio hidden by an import blocker: rc 2 before any work, naming both (and not an installed
    tensorboard) and how to install them."""
    asked = ["tensorboard", "wandb", "trackio"] if "tensorboard" in TRACKERS else ["wandb", "trackio"]
    hide = ("import sys, runpy\n"
            "class Hide:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('wandb', 'trackio'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            f"sys.argv = ['train.py', '--out', {str(tmp_path / 'run')!r}, '--report-to', *{asked!r}]\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=tracker_env(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "--report-to wandb trackio" in last and "pip install 'wandb==" in last and "'trackio==" in last
    assert "tensorboard==" not in last
    assert not (tmp_path / "run").exists()  # stopped before the run folder was made


@pytest.mark.slow  # starts processes that import torch / train.py
def test_wandb_with_a_key_but_no_reachable_server_logs_offline(tmp_path):
    """An API key and a server that refuses connections: offline after one refused connect, not wandb's 90 s of
    retries and a stopped run."""
    pytest.importorskip("wandb")
    import socket
    with socket.socket() as sock:  # a free port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**tracker_env(tmp_path), "WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{port}"}
    start = ("import sys; from pathlib import Path; sys.path.insert(0, '.'); from trackers import WandB; "
             f"w = WandB(Path({str(tmp_path / 'run')!r}), {{'host': 'h', 'started': 't'}}, 0, False); "
             "w.log({'step': 1, 'reward': 0.5}); w.close(); print('offline' if w.offline else 'online')")
    (tmp_path / "run").mkdir()
    proc = subprocess.run([sys.executable, "-c", start], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cannot reach the server" in proc.stderr and proc.stdout.splitlines()[-1] == "offline"
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and wandb_history(files[0])[0] == {1: {"reward": 0.5}}
