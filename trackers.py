"""Experiment trackers beside metrics.jsonl: every record train.py logs also goes to TensorBoard, Weights & Biases
or trackio (`--report-to`), under the same names and the same step. metrics.jsonl stays the source of truth (eval.py
plot/summary/compare read it); a tracker is an output. Rank 0 only; run.json becomes the tracker's run config.

Offline by default, and nothing waits on a network:
    tensorboard   event files in RUN/tensorboard; a --resume purges the events after the checkpoint's step
    wandb         offline mode unless WANDB_MODE says otherwise or an API key is set (WANDB_API_KEY, ~/.netrc) and
                  its server answers within 5 s; files in RUN/wandb, the `wandb sync` command printed; no system
                  metrics, git or machine probes, no crash reports
    trackio       its local SQLite database (TRACKIO_DIR, default ~/.cache/huggingface/trackio); no dashboard
                  server, no system monitors; TRACKIO_SPACE_ID / TRACKIO_SERVER_URL send it elsewhere (with a stored
                  Hugging Face token it asks the Hub's whoami for a username unless HF_HUB_OFFLINE=1)

A resumed run continues the same tracker run: the run id comes from run.json (folder, host, start time), which a
--resume keeps. The packages are optional (requirements-trackers.txt); train.py asks `missing_packages` at parse time
and `import_error` (they import) before it writes anything.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import netrc
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

TRACKERS = ("tensorboard", "wandb", "trackio")
INSTALL = {"tensorboard": "tensorboard==2.21.0", "wandb": "wandb==0.31.0", "trackio": "trackio==0.43.0"}
PROJECT = "valuerl"


def missing_packages(names) -> list[str]:
    """The trackers among `names` whose package does not import here (checked without importing it)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install, or a module that hides itself
            found = False
        if not found:
            missing.append(name)
    return missing


def import_error(names) -> str | None:
    """Why a --report-to tracker could not start: its package missing, or installed but failing to import (a broken
    or shadowed install), found by importing it now, before the run writes anything (the run imports it later
    anyway). None when each imports."""
    for name in names:
        if name == "none":
            continue
        if missing_packages([name]):
            return f"--report-to {name} needs its package: {install_line([name])}"
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - whatever a broken package raises, the run could not log to it
            spec = importlib.util.find_spec(name)
            where = f" from {spec.origin}" if spec is not None and spec.origin else ""
            reason = (str(e).splitlines() or [""])[0][:150]
            return (f"--report-to {name}: the {name} package{where} does not import ({type(e).__name__}: {reason}); "
                    f"reinstall it: pip install --force-reinstall '{INSTALL[name]}'")
    return None


def install_line(names) -> str:
    pins = " ".join(f"'{INSTALL[name]}'" for name in names)
    return f"pip install {pins}   (or: pip install -r requirements-trackers.txt)"


def run_id(out: Path, record: dict) -> str:
    """A stable id for the run in this folder: the same on every --resume (run.json keeps `started`), new for a
    fresh run."""
    key = f"{out.resolve()}|{record.get('host')}|{record.get('started')}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class TensorBoard:
    """Scalars as float64 tensors (new-style summaries: the exact JSON value, not a float32 copy); strings as text."""

    def __init__(self, out: Path, config: dict, start_step: int, resumed: bool):
        from tensorboard.plugins.text.summary_v2 import text_pb
        from torch.utils.tensorboard import SummaryWriter
        self.text_pb = text_pb  # a text summary under the tag itself (SummaryWriter.add_text appends "/text_summary")
        # purge_step: readers drop earlier events at steps >= it. A resumed run drops what a killed run wrote after its
        # checkpoint, a fresh run in an old folder drops the old run: as metrics.jsonl does with its lines
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step + 1 if resumed else 0)
        self.text("run.json", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", start_step)

    def log(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key == "step" or value is None:
                continue
            if isinstance(value, (int, float)):  # bools too
                self.writer.add_scalar(key, float(value), step, new_style=True, double_precision=True)
            else:
                self.text(key, str(value), step)
        self.writer.flush()  # a run killed mid-way keeps every logged step

    def text(self, tag: str, value: str, step: int) -> None:
        self.writer.file_writer.add_summary(self.text_pb(tag, value), step)

    def close(self) -> None:
        self.writer.close()


def wandb_api_key_present() -> bool:
    """An API key wandb would use: WANDB_API_KEY, an identity token file, or ~/.netrc for its host (no network)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def unreachable(url: str, timeout_s: float = 5.0) -> str | None:
    """Why a TCP connection to the server of `url` fails within timeout_s, or None when it connects."""
    parts = urlparse(url)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout_s).close()
    except OSError as e:
        return f"{parts.hostname}: {e}"
    return None


class WandB:
    """wandb.init in offline mode unless asked otherwise; the run id from run.json, so --resume continues it.

    Offline, wandb cannot resume a run (it has no server to ask for the run's last step): a --resume writes a second
    offline file with the same run id, and `wandb sync` uploads a run's files in order of start time."""

    def __init__(self, out: Path, config: dict, start_step: int, resumed: bool):
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_present() else "offline")
        if mode == "online" and (why := unreachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))):
            print(f"[wandb] cannot reach the server ({why}): logging offline instead", file=sys.stderr, flush=True)
            mode = "offline"  # wandb itself would retry for init_timeout (90 s), then stop the run
        try:
            self.run = self._init(out, config, resumed, mode)
        except Exception as e:  # noqa: BLE001 - online: a refused key, a server that answers wrongly
            if mode != "online":
                raise
            print(f"[wandb] online start failed ({type(e).__name__}: {e}): logging offline instead", file=sys.stderr,
                  flush=True)
            import wandb
            wandb.teardown()  # the failed start keeps the run id registered in wandb's service process
            mode, self.run = "offline", self._init(out, config, resumed, "offline")
        self.offline, self.out = mode != "online", out

    @staticmethod
    def _init(out: Path, config: dict, resumed: bool, mode: str):
        import wandb
        if mode != "online":
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # no crash reports to sentry either
        settings = wandb.Settings(mode=mode, x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True,
                                  disable_git=True, save_code=False, console="off", init_timeout=30)
        return wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=out.name, id=run_id(out, config),
                          dir=str(out), config=config, resume="allow" if resumed else None, settings=settings)

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def close(self) -> None:
        self.run.finish()
        if self.offline:  # every file of this run (one per --resume), uploaded in order of start time
            print(f"[wandb] offline run; upload it with: wandb sync {self.out / 'wandb'}/offline-run-*-{self.run.id}",
                  flush=True)


class Trackio:
    """trackio.init on its local database (a --resume continues the run of the same name); no server is started."""

    def __init__(self, out: Path, config: dict, start_step: int, resumed: bool):
        import trackio
        name = f"{out.name}-{run_id(out, config)[:8]}"
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=name, config=config,
                                resume="allow" if resumed else "never", embed=False, auto_log_cpu=False,
                                auto_log_gpu=False)

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The chosen trackers as one: log(record) sends a metrics.jsonl record to each; close() finishes them."""

    def __init__(self, names, out: Path, config: dict, start_step: int, resumed: bool):
        kinds = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}
        self.trackers = [kinds[name](out, config, start_step, resumed) for name in names if name != "none"]

    def log(self, record: dict) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
