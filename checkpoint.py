"""Checkpoints: sharded for resuming (torch.distributed.checkpoint), Hugging Face folders for everything else.

    checkpoint-N/                 written as .tmp-checkpoint-N/ and renamed into place once complete
        sharded/                  actor weights + AdamW state, DCP: __<rank>_0.distcp per rank + .metadata
        critic/                   PPO / VC-PPO / GenAC: the critic's config, tokenizer, sharded/
                                  (+ GenAC's genac_state.json)
        config.json, generation_config.json, tokenizer files
        trainer_state.pt          step, data position, RNG, the algorithm's small state, world size
        model.safetensors         the last checkpoint of a run only (and `python eval.py export CKPT [OUT]`):
        critic/model.safetensors  what from_pretrained and vLLM load

No rank gathers the model or the optimizer to save: every rank writes its own shard. The Hugging Face weights are
read back from the shards by rank 0 alone, one safetensors file (<= EXPORT_SHARD_MB) at a time. --resume reads the
shards at any world size (DCP reshards: each rank reads the slices it owns); with another world size than the one
that saved, the weights and optimizer continue exactly but the prompts-per-rank split changes the run from there.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from actor import stream_full_parameters

EXPORT_SHARD_MB = 2048  # Hugging Face safetensors files are cut at this size; an export holds one in memory


# ---------------------------------------------------------------------------------------------
# Sharded model + optimizer (every rank its own shard), Hugging Face folders (streamed)


@contextmanager
def _one_process_ok():
    """DCP warns on every save/load without a process group ("assuming the intent is to ... in a single process"):
    one process is what we mean there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def tied_aliases(model) -> set[str]:
    """state_dict names that alias another weight (a tied lm_head): stored once, tied again on load."""
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return set(model.state_dict()) - own


def save_sharded(folder, model, optimizer) -> None:
    """Model and optimizer state as a DCP folder: every rank writes its own shard (__<rank>_0.distcp), rank 0 the
    .metadata; nothing is gathered. All ranks call. Keys are the plain parameter names (get_state_dict), so any
    world size can load it (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    for name in tied_aliases(model):
        model_state.pop(name, None)
    with _one_process_ok():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder),
                 no_dist=not dist.is_initialized())


def load_sharded(folder, model, optimizer) -> None:
    """Inverse of save_sharded: each rank reads the slices of its own shard, whatever world size saved them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)  # allocates the optimizer state to read into
    aliases = tied_aliases(model)
    state = {"model": {k: v for k, v in model_state.items() if k not in aliases}, "optimizer": optim_state}
    with _one_process_ok():
        dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=not aliases))


def write_safetensors(named_tensors, folder, shard_mb: float = EXPORT_SHARD_MB) -> None:
    """(name, tensor) pairs -> folder/model.safetensors, or model-0000k-of-0000n.safetensors +
    model.safetensors.index.json past `shard_mb` (the layout transformers and vLLM load); one file's tensors in
    memory at a time. folder None: the pairs are consumed and dropped (ranks that only join
    stream_full_parameters' gathers)."""
    from safetensors.torch import save_file
    files, shard, weight_map, held = [], {}, {}, [0]  # held[0]: bytes in `shard`

    def flush():
        files.append(Path(folder) / f".model-{len(files) + 1:05d}.safetensors")
        save_file({k: v.contiguous() for k, v in shard.items()}, files[-1], metadata={"format": "pt"})
        weight_map.update({k: len(files) - 1 for k in shard})
        shard.clear()
        held[0] = 0

    for name, tensor in named_tensors:
        if folder is not None:
            if shard and held[0] + tensor.nbytes > shard_mb * 2 ** 20:
                flush()
            shard[name] = tensor.cpu()
            held[0] += tensor.nbytes
    if folder is None:
        return
    if shard or not files:
        flush()
    n = len(files)
    names = [f.with_name("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
             for i, f in enumerate(files)]
    for f, target in zip(files, names):
        f.rename(target)
        target.chmod(0o644)  # safetensors writes 0600 files; a model folder is read by others too
    if n > 1:
        (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(f.stat().st_size for f in names)},
             "weight_map": {k: names[i].name for k, i in sorted(weight_map.items())}}, indent=2))


def write_model_files(folder, model, tokenizer, files: dict | None = None) -> None:
    """Everything of a model folder but the weights: config, generation config, tokenizer, `files` ({name: text})."""
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for name, text in (files or {}).items():
        (Path(folder) / name).write_text(text)


def save_model_folder(folder, model, tokenizer, optimizer=None, files: dict | None = None) -> None:
    """A model folder, written to a temporary sibling and renamed into place. All ranks call; rank 0 writes the
    small files (write_model_files).
    optimizer given (a checkpoint's critic): weights and optimizer state as DCP shards in folder/sharded, every rank
    its own (save_sharded); `python eval.py export` turns them into safetensors.
    optimizer None: a Hugging Face folder (from_pretrained, vLLM): the weights gathered a bucket at a time
    (actor.stream_full_parameters) and written by rank 0; no rank holds the whole model."""
    folder = Path(folder)
    tmp, rank0 = folder.with_name(f".tmp-{folder.name}"), not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()  # nobody writes into a folder rank 0 is still clearing
    if optimizer is not None:
        save_sharded(tmp / "sharded", model, optimizer)
    else:
        write_safetensors(stream_full_parameters(model, tied=False), tmp if rank0 else None)
    if rank0:
        write_model_files(tmp, model, tokenizer, files)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    if dist.is_initialized():
        dist.barrier()


def read_sharded_weights(folder, shard_mb: float = EXPORT_SHARD_MB):
    """-> (name, tensor) of the model weights in a save_sharded folder, read in groups of <= shard_mb (no process
    group needed: one process reads every rank's files)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    entries = [(key[len("model."):], m) for key, m in metadata.items() if key.startswith("model.")]
    group, size, limit = [], 0, shard_mb * 2 ** 20
    for name, m in [*entries, (None, None)]:  # None: read the last group
        nbytes = m.size.numel() * m.properties.dtype.itemsize if m is not None else 0
        if group and (m is None or size + nbytes > limit):
            tensors = {n: torch.empty(g.size, dtype=g.properties.dtype) for n, g in group}
            with _one_process_ok():
                dcp.load({"model": tensors}, checkpoint_id=str(folder), no_dist=True)
            group, size = [], 0
            while tensors:
                yield tensors.popitem()
        if m is not None:
            group.append((name, m))
            size += nbytes


def export_checkpoint(checkpoint, out=None, shard_mb: float = EXPORT_SHARD_MB) -> list[Path]:
    """The Hugging Face folders of a checkpoint: its sharded actor (and critic/) -> safetensors next to their config
    and tokenizer, in `out` (default: in place). One process, one file in memory at a time. -> the folders written."""
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else checkpoint
    if not (checkpoint / "sharded" / ".metadata").is_file():
        raise FileNotFoundError(f"{checkpoint} holds no sharded weights (sharded/.metadata): not a train.py checkpoint")
    written = []
    for sub in ("", "critic"):
        source, target = checkpoint / sub, out / sub
        if not (source / "sharded" / ".metadata").is_file():
            continue
        target.mkdir(parents=True, exist_ok=True)
        if target.resolve() != source.resolve():
            for f in source.iterdir():  # config, tokenizer, genac_state.json; not the shards, state or the critic
                if f.is_file() and f.name != "trainer_state.pt" and not f.name.startswith("."):
                    shutil.copy2(f, target / f.name)
        for old in [*target.glob("model*.safetensors"), *target.glob("model.safetensors.index.json")]:
            old.unlink()
        write_safetensors(read_sharded_weights(source / "sharded", shard_mb), target, shard_mb)
        written.append(target)
    return written


# ---------------------------------------------------------------------------------------------
# The loop's checkpoints


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in out.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.pt").is_file())
    return done[-1] if done else None


def save_checkpoint(out: Path, step: int, model, optimizer, tokenizer, stream, algo, rank: int, keep: int,
                    generated_total: int = 0, final: bool = False) -> Path:
    """checkpoint-N (layout above), atomic: written to .tmp-checkpoint-N, trainer_state.pt last, renamed into place by
    rank 0 (a crash leaves at most a .tmp folder that --resume never picks). All ranks call: each writes its own
    shard of the actor and of the algorithm's models (algo.save). final: the Hugging Face weights too, exported by
    rank 0 from the shards just written."""
    final_dir, tmp = out / f"checkpoint-{step:06d}", out / f".tmp-checkpoint-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    save_sharded(tmp / "sharded", model, optimizer)
    algo.save(tmp)  # e.g. tmp/critic
    algo_state = algo.state_dict()
    if rank == 0:
        write_model_files(tmp, model, tokenizer)
        torch.save({"step": step, "stream": stream.state_dict(), "algorithm": algo_state,
                    "generated_tokens": generated_total,
                    "world": dist.get_world_size() if dist.is_initialized() else 1,
                    "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                            "torch": torch.get_rng_state()}},
                   tmp / "trainer_state.pt")
        if final:
            export_checkpoint(tmp)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
        for old in sorted(out.glob("checkpoint-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final_dir


def read_trainer_state(folder: Path, out: Path, required: tuple[str, ...] = ()) -> dict:
    """trainer_state.pt of a checkpoint, or exit with an error naming it, what is wrong and the older checkpoints.
    required: files the resuming algorithm keeps in each checkpoint (PPO's critic/sharded/.metadata): without them
    the checkpoint is another algorithm's. Reads only: a refused resume leaves the run folder as it was."""
    older = [p.name for p in sorted(out.glob("checkpoint-*")) if p != folder and (p / "trainer_state.pt").is_file()]
    hint = (f"Older checkpoints: {', '.join(older)}; move {folder.name} away to resume from {older[-1]}." if older
            else "No older checkpoint in this folder.")
    try:
        state = torch.load(folder / "trainer_state.pt", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated, zeroed, not a torch file: all unreadable
        sys.exit(f"train.py: error: cannot resume: {folder / 'trainer_state.pt'} is damaged "
                 f"({type(e).__name__}: {str(e)[:200]}). " + hint)
    if not (folder / "sharded" / ".metadata").is_file():
        sys.exit(f"train.py: error: cannot resume: {folder} has no sharded/.metadata (a checkpoint of an older "
                 "train.py, which kept full weights and optimizer, or a damaged one). " + hint)
    if missing := [name for name in required if not (folder / name).is_file()]:
        sys.exit(f"train.py: error: cannot resume: {folder} has no {', '.join(missing)}: it was written by another "
                 "--algo; resume with the --algo that wrote it, or start this run in another --out")
    return state


def load_checkpoint(folder: Path, state: dict, model, optimizer, stream, algo, world: int) -> tuple[int, int]:
    """Restores what save_checkpoint wrote: the actor's weights and optimizer from its shards (any world size),
    data position, algorithm state, RNG -> (step, generated tokens). The algorithm read its own folders in __init__."""
    saved_world = state.get("world", world)
    if saved_world != world and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"[resume] {folder.name} was written by {saved_world} ranks, resumed on {world}: weights and "
              "optimizer state are resharded exactly, but prompts are split over ranks differently from here on",
              file=sys.stderr)
    load_sharded(folder / "sharded", model, optimizer)
    stream.load_state_dict(state["stream"])
    algo.load_state_dict(state["algorithm"])
    (random.setstate(state["rng"]["python"]), np.random.set_state(state["rng"]["numpy"]),
     torch.set_rng_state(state["rng"]["torch"]))
    return state["step"], state.get("generated_tokens", 0)
