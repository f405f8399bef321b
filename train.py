"""The one training loop: generate (vLLM) -> score -> old log-probs -> advantages -> update -> sync.

Every algorithm is "PPO with a different advantage" (verl's framing; --clip-high 0.28 on any is DAPO's
clip-higher); `--algo` picks one entry of ALGORITHMS (flags.py: the one list of algorithms, name -> "module.Class"),
and the loop never asks which one it got:

    grpo   (r - mean) / (std + 1e-6) per prompt group; --no-std gives Dr.GRPO        advantage.py
    rloo   r_i - mean_{j != i} r_j                                                     advantage.py
    ppo    discriminative critic V_t, token-level GAE, batch-whitened                 critic.py
    vcppo  ppo after 6 iterations of value pretraining on the frozen actor            critic.py
    genac  generative critic judges each segment's state in text, ICC hints, GAE       genac.py
    v05    generalist value prior fused with sparse rollouts, OSLA extra rollouts     prior.py
    poise  hidden-state probe, cross-rollout baselines, 2 rollouts per prompt         probe.py

The algorithm interface (every class in ALGORITHMS has exactly these; advantage.GRPO is the shortest example):

    add_arguments(parser)            static: its own flags, and its defaults for shared ones (parser.set_defaults)
    check_arguments(args)            static, at parse time: raise ValueError naming a bad flag (one line); may fill
                                     defaults that depend on other flags (GenAC's cpu/paper profile follows --model).
                                     Both come from the algorithm's flags class in flags.py (GRPOFlags, ...; with
                                     model_flags, resume_fixed, checkpoint_files: what a start checks), torch-free,
                                     which the class inherits (`class GRPO(GRPOFlags)`): a bad flag stops in < 2 s
    __init__(args, actor, tokenizer, device, world, checkpoint)
                                     its state: critic, prior or probe (checkpoint: the folder resumed from, or None;
                                     a critic reads its shards from checkpoint/critic, checkpoint.load_sharded)
    warmup_steps: int                iterations before RL that train only the algorithm's own model (VC-PPO: 6)
    memory_parts                     class attribute: what the memory plan counts beside the actor (memory.py):
                                     a subset of {'value critic', 'generative critic', 'prior embedder',
                                     'hidden states'}
    hidden_features                  None, or (decoder layer, pool(mb, hidden [b,T,H], entropy [b,R]) -> [b,F]):
                                     what the old-log-prob pass keeps of the actor's hidden states (POISE)
    sample(problems, prompt_ids, generate, seed) -> (samples[prompt][i], flat rewards, metrics)
                                     how it samples; generate(counts per prompt, seed) -> (samples, rewards)
    advantages(batch, problems) -> (token advantages [N, R], metrics)
    engine_max_model_len, use_engine(engine)
                                     OPTIONAL: the context the algorithm needs on the loop's engine, and the engine
                                     handed over once built (GenAC's critic judges on it with its weights swapped in)
    token_losses(logp, old_logp, advantages, mask, args) -> (losses [b, R], clipped [b, R] bool)
                                     OPTIONAL: the actor's per-token loss (default: PPO-clip with verl's guards,
                                     actor.ppo_clip_losses); aggregated by --loss-agg (set its default in
                                     add_arguments). tests/test_loss_interface.py changes the ratio this way
    after_update(batch) -> metrics   after the actor's update: critic step, prior update (no-op for GRPO)
    state_dict() / load_state_dict(state), save(folder), close()
                                     small checkpoint state (all ranks call; rank 0's goes into trainer_state.pt), its
                                     models' shards in a checkpoint (checkpoint.save_model_folder), engines

A start checks, then writes (a bad input stops with ONE line and leaves every file as it was):
    check_start             before torch is imported: flags, data files, models named by a path, --out (writable;
                            on --resume: the run recorded there is this algorithm's and this model's), trackers
    main, before loading    prompt lengths (the tokenizer), the resumed checkpoint's files, the memory plan
    main, once it can run   the run folder and run.json: after the models, the algorithm and the engine are built

One step of the loop (`main`):
    1. generate + score     algo.sample(...) drives the engine through `generate_and_score`
    2. old log-probs        the trainer's own no-grad pass (+ entropies, + pooled hidden features)
    3. advantages           algo.advantages(batch, problems)
    4. update               actor.ppo_update (skipped during warm-up), then algo.after_update(batch)
    5. sync                 the new weights into the engine
    6. log                  metrics.jsonl, evaluation every --eval-every, checkpoints every --save-every

Run it:
    python train.py                                   # GRPO, SmolLM2-135M (offline), arithmetic, CPU
    python train.py --algo genac --help               # an algorithm's own flags
    torchrun --nproc_per_node=8 train.py --algo grpo --model Qwen/Qwen2.5-Math-1.5B \
        --data train.jsonl --eval-data math500.jsonl --lr 1e-6 --max-new-tokens 2048     # one 8-GPU node
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$RANK --master_addr=$ADDR --master_port=29500 train.py ...
    python train.py --out runs/grpo --resume          # continue exactly; then: python eval.py plot runs/grpo
    python eval.py export runs/grpo/checkpoint-000010 OUT   # a sharded checkpoint as a Hugging Face folder
                                                            # (checkpoint.py)
    python eval.py memory --model CONFIG --world 8    # what each GPU holds in each phase (memory.py)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

from data import DataError, Problem, format_prompt, load_problems
from flags import algorithm_class, algorithm_flags, context_error, model_error, parse_train_args
from runrecord import load as load_run_record, mark_done, out_error, resume_error, write_start
from trackers import Trackers, import_error


def parse_args(argv=None) -> argparse.Namespace:
    """Shared flags, then the chosen algorithm's own (`--algo X --help` lists them), each checked: flags.py, without
    importing torch (an algorithm's flags are in its torch-free flags class there, which the algorithm inherits)."""
    return parse_train_args(sys.argv[1:] if argv is None else argv, prog="train.py", description=__doc__)


def check_start(argv=None) -> tuple[argparse.Namespace, list[Problem], list[Problem]]:
    """Every input a start can check before it imports torch or writes a byte, in the order a user fixes them: the
    flags; the data files (a file, UTF-8, well-formed rows); the models named by a path; --out (writable; on --resume
    the run recorded there is this algorithm's and this model's); the trackers' packages (they import). A bad one
    stops with ONE line: status 2 for a flag, 1 for a file, folder or package. What needs the tokenizer (prompt
    lengths) or torch (the checkpoint's state) is checked in `main`, still before the run folder is written.
    -> (args, training problems, held-out problems)."""
    args = parse_args(argv)
    flags = algorithm_flags(args.algo)  # its model folders, the flags a resume keeps
    held_out = ((args.eval_data, "benchmark", "--eval-data") if args.eval_data
                else (args.data, "heldout", "--data") if args.data.startswith("arithmetic") else None)
    flag = "--data"
    try:
        train_problems = load_problems(args.data, "train", args.seed, args.problem_key, args.answer_key)
        flag = held_out[2] if held_out else flag
        eval_problems = (load_problems(*held_out[:2], args.seed, args.problem_key, args.answer_key)[: args.eval_n]
                         if held_out else [])
    except DataError as e:
        sys.exit(f"train.py: error: {flag}: {e}")
    models = [("model", True), *((dest, True) for dest in flags.model_flags),
              *((dest, False) for dest in flags.folder_flags)]  # (dest, a hub name allowed)
    for dest, hub in models:
        if message := model_error(f"--{dest.replace('_', '-')}", getattr(args, dest, None), hub_names=hub):
            sys.exit(f"train.py: error: {message}")
    for message in (context_error(args.model, args), out_error(Path(args.out), args.resume),
                    resume_error(Path(args.out), args, ("algo", "model", *flags.resume_fixed)) if args.resume else None,
                    import_error(args.report_to)):
        if message:
            sys.exit(f"train.py: error: {message}")
    return args, train_problems, eval_problems


if __name__ == "__main__":  # every input above is checked here, before the heavy imports below (5-10 s)
    START = check_start()

# (the imports below come after that check on purpose)
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # before torch loads: C++ warnings off, errors still shown
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoTokenizer

from actor import adamw, all_reduce, compute_old_logprobs, load_actor, ppo_update, stream_full_parameters
from checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state, save_checkpoint
from memory import PLANNED_FLAGS, device_capacity_gb, run_plan
from rollout import (build_rollout_batch, default_engine, evaluate, make_engine, quiet_third_party_output,
                     resolve_model_path)
from verifier import MathVerifier, score_responses


def setup_distributed(timeout_s: float = 3600.0):
    """-> (rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is rank 0 of 1.
    timeout_s: how long a collective waits (NCCL's default, 10 min, is shorter than a long judge phase or rank 0's
    final export); device_id binds the NCCL communicator to this rank's GPU at once."""
    from datetime import timedelta
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
              else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


def check_shared_out(out: Path, rank: int, world: int) -> None:
    """Every rank must see the same --out (one filesystem shared by all nodes: rank 0 writes the checkpoints' metadata
    and the others their shards into it). Rank 0 writes a nonce there; a rank that cannot read it stops."""
    if world == 1:
        return
    nonce_path = out / f".shared-check-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    nonce = [f"{os.getpid()}-{time.time_ns()}-{random.SystemRandom().random()}" if rank == 0 else None]
    if rank == 0:
        nonce_path.write_text(nonce[0])
    dist.broadcast_object_list(nonce, src=0)
    seen = nonce_path.read_text() if nonce_path.is_file() else None
    ok = all_reduce(torch.tensor([float(seen == nonce[0])]), dist.ReduceOp.MIN).item() > 0
    if rank == 0:
        nonce_path.unlink(missing_ok=True)
    if not ok:
        sys.exit(f"error: rank {rank}: --out {out} is not the same folder on every rank (rank 0's marker "
                 f"{'is not there' if seen is None else 'differs'}); a multi-node run needs one shared filesystem "
                 "for --out")


# ---------------------------------------------------------------------------------------------
# 1. Generation and scoring, as the algorithms call it


def generate_and_score(engine, problems: list[Problem], prompt_ids: list[list[int]], args, verifier, stats: dict,
                       counts: list[int], seed: int) -> tuple[list, list[float]]:
    """counts[p] samples of prompt p in ONE engine call, scored -> (samples[p][i], flat rewards); adds the
    scoring time and counts to `stats`."""
    samples = engine.generate(prompt_ids, counts, args.max_new_tokens, args.temperature, args.top_p, seed)
    t = time.time()
    flat = [(p, s) for p, group in enumerate(samples) for s in group]
    rewards, st = score_responses([s.text for _, s in flat], [problems[p] for p, _ in flat], verifier,
                                  [s.finish_reason for _, s in flat])
    for key, value in (("time/score", time.time() - t), ("score_timeouts", st.timeouts),
                       ("empty_responses", st.empty_responses), ("truncated", st.truncated)):
        stats[key] += value
    return samples, rewards


# ---------------------------------------------------------------------------------------------
# 6. Metrics of a step, global over ranks


def rollout_metrics(batch, stats: dict, actor_ran: bool) -> dict:
    """Reward, lengths, entropy, engine-trainer log-prob gap, advantage statistics and scoring counts."""
    mask = batch.response_mask
    seq_adv = (batch.advantages * mask).sum(1) / mask.sum(1).clamp(min=1)  # [N] mean advantage per rollout
    local = {"reward": batch.rewards.sum(), "rollouts": len(batch), "generated_tokens": mask.sum(),
             "trained_tokens": batch.attention_mask.sum(), "entropy": (batch.entropies * mask).sum(),
             "logprob_gap": (batch.old_logprobs - batch.engine_logprobs).abs().mul(mask).sum(), "adv": seq_adv.sum(),
             "adv_sq": (seq_adv ** 2).sum(), "zero_adv": (seq_adv.abs() < 1e-8).sum(),
             "score_timeouts": stats["score_timeouts"], "empty_responses": stats["empty_responses"],
             "truncated": stats["truncated"]}
    s = dict(zip(local, all_reduce(torch.tensor([float(v) for v in local.values()], dtype=torch.float64)).tolist()))
    n, tokens = s["rollouts"], max(s["generated_tokens"], 1.0)
    record = {"reward": s["reward"] / n, "response_length": tokens / n, "rollouts": int(n),
              "generated_tokens": int(s["generated_tokens"]), "trained_tokens": int(s["trained_tokens"]),
              "entropy": s["entropy"] / tokens, "logprob_diff_engine_trainer": s["logprob_gap"] / tokens,
              "adv_mean": s["adv"] / n, "adv_std": math.sqrt(max(s["adv_sq"] / n - (s["adv"] / n) ** 2, 0.0)),
              "zero_adv_frac": s["zero_adv"] / n, "score_timeouts": int(s["score_timeouts"]),
              "empty_responses": int(s["empty_responses"]), "truncated_frac": s["truncated"] / n}
    if not actor_ran:  # warm-up: no trainer forward pass of the actor in this iteration
        del record["entropy"], record["logprob_diff_engine_trainer"]
    return record


# ---------------------------------------------------------------------------------------------
# Data position (checkpoints: checkpoint.py)


class PromptStream:
    """A seeded shuffle of the training problems per epoch; (epoch, position) is the resumable state."""

    def __init__(self, problems: list[Problem], seed: int):
        self.problems, self.seed, self.epoch, self.position = problems, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            if self.position == len(self._order):  # epoch boundary
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.problems[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle()


# ---------------------------------------------------------------------------------------------
# The loop


def main(argv=None, start=None) -> None:
    """A run: the checks (check_start, or `start` when the script's __main__ block made them), loading, the loop.
    Nothing is written until everything is loaded and the engine is built: a start that fails leaves every file
    as it was, and no run folder where there was none."""
    args, train_problems, eval_problems = start or check_start(argv)
    quiet_third_party_output()
    rank, world, device = setup_distributed(args.dist_timeout)
    master, out, local_prompts = rank == 0, Path(args.out), args.prompts_per_step // world
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    try:
        base_model = resolve_model_path(args.model)
    except FileNotFoundError as e:  # the offline default's package missing (a path was checked by check_start)
        sys.exit(f"train.py: error: {e}")
    # what needs the tokenizer or torch, still before a byte is written: prompt lengths, the checkpoint resumed
    resume_from = latest_checkpoint(out) if args.resume else None
    resume_state = (read_trainer_state(resume_from, out, algorithm_flags(args.algo).checkpoint_files)
                    if resume_from else None)
    tokenizer = AutoTokenizer.from_pretrained(str(resume_from) if resume_from else base_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sources = ((train_problems, "--data", args.data),
               (eval_problems, "--eval-data" if args.eval_data else "--data", args.eval_data or args.data))
    too_long = next(((p, n, flag, spec) for problems, flag, spec in sources for p in problems
                     if (n := len(format_prompt(tokenizer, p))) > args.max_prompt_tokens), None)
    if too_long:
        problem, n, flag, spec = too_long
        sys.exit(f"train.py: error: {flag} {spec}: problem {problem.id!r} has a {n}-token prompt, over "
                 f"--max-prompt-tokens {args.max_prompt_tokens}; raise --max-prompt-tokens or shorten that problem")
    if args.model is None and (message := context_error(base_model, args)):  # a given folder: check_start's
        sys.exit(f"train.py: error: {message}")
    # The memory plan, before anything loads (memory.py): fills the flags left unset and, on a GPU (or with --gpu-gb),
    # stops a run that would not fit, naming the phase, the bytes over and the flag to change
    gpu_gb = args.gpu_gb or device_capacity_gb(device)
    critic_path = getattr(args, "critic_model", None)
    plan_args = argparse.Namespace(**{**vars(args), "model": base_model})
    critic = resolve_model_path(critic_path) if critic_path else None
    line = run_plan(plan_args, world, gpu_gb, critic, device.type)
    for key in (*PLANNED_FLAGS, "share_prompts"):  # the flags left unset, as the plan chose them
        setattr(args, key, getattr(plan_args, key))
    if master:
        print(line, file=sys.stderr, flush=True)
    if master:  # which rows are held out
        if args.eval_data:
            held_out_text = f"{len(eval_problems)} of {args.eval_data} (--eval-data)"
        elif args.data.startswith("arithmetic"):
            held_out_text = (f"{len(eval_problems)} of the arithmetic task's held-out split "
                             "(disjoint by a hash of the text)")
        else:
            held_out_text = "none (a file has no held-out split: pass --eval-data FILE)"
        if args.no_eval:
            held_out_text += ", not evaluated (--no-eval)"
        print(f"[data] train: {len(train_problems)} problems of {args.data}; held-out: {held_out_text}",
              file=sys.stderr)
    recorded_args = argparse.Namespace(**vars(args))  # run.json's: as given, with the plan's choices (written below)
    model = load_actor(base_model, device, world, args)  # a resumed run's shards are read over it (load_checkpoint)
    ref_model = load_actor(base_model, device, world, args).eval() if args.kl_coef > 0 else None
    optimizer = adamw(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    args.model = base_model
    try:
        algo = algorithm_class(args.algo)(args, model, tokenizer, device, world, resume_from)
    except (FileNotFoundError, ImportError, ValueError) as e:  # e.g. --probe-layer past the model's depth
        sys.exit(f"train.py: error: {e}")
    stream = PromptStream(train_problems, args.seed)
    start_step, generated_total = (load_checkpoint(resume_from, resume_state, model, optimizer, stream, algo, world)
                                   if resume_from else (0, 0))
    if args.resume and master:
        print(f"[resume] from {resume_from} at step {start_step}" if resume_from
              else f"[resume] no checkpoint in {out}; starting from scratch", file=sys.stderr)
    # ONE engine per process (rollout.VLLMEngine): the actor generates on it, GenAC's critic judges on it with its
    # weights swapped in, so it holds the longer of their contexts (algo.engine_max_model_len) and is handed over
    max_model_len = max(args.max_prompt_tokens + args.max_new_tokens, getattr(algo, "engine_max_model_len", 0))
    engine = make_engine(args.engine or default_engine(), base_model, dtype=args.engine_dtype,
                         seed=args.seed + 1000 * rank, max_model_len=max_model_len,
                         gpu_memory_utilization=args.gpu_memory_utilization, world_size=world,
                         max_num_seqs=args.engine_max_num_seqs,
                         max_num_batched_tokens=args.engine_max_num_batched_tokens, device_type=device.type)
    if hasattr(algo, "use_engine"):
        algo.use_engine(engine)
    if resume_from:  # the engine starts from the base weights: give it the resumed ones
        engine.load_weights(stream_full_parameters(model, args.sync_bucket_mb, engine.dtype), holder="actor")
    verifier = (MathVerifier(timeout_s=args.verifier_timeout)
                if any(p.kind == "math" for p in train_problems + eval_problems) else None)
    # The run can start: the first bytes it writes. run.json (args, versions, git commit, model and data hashes; a
    # --resume appends to it) in a folder that every rank must see (check_shared_out)
    if master:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # check_start found it writable: changed since, or refused beyond permissions
            sys.exit(f"train.py: error: --out {out}: cannot create it ({e.strerror or e}); choose another --out")
    check_shared_out(out, rank, world)
    if master:
        write_start(out, recorded_args, sys.argv[1:] if argv is None else argv, base_model, train_problems,
                    eval_problems, device, world)
    metrics_path = out / "metrics.jsonl"
    if master and not args.resume:
        metrics_path.unlink(missing_ok=True)
    # a run killed after logging past its checkpoint: drop those lines
    if master and resume_from and metrics_path.exists():
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
        metrics_path.with_suffix(".tmp").write_text("".join(line + "\n" for line in kept))
        os.replace(metrics_path.with_suffix(".tmp"), metrics_path)
    # --report-to: the same records to TensorBoard / wandb / trackio too, with run.json as their run config
    trackers = Trackers(args.report_to, out, load_run_record(out), start_step, bool(resume_from)) if master else None
    log = functools.partial(append_jsonl, metrics_path, trackers=trackers) if master else lambda record: None
    run_eval = functools.partial(evaluate_heldout, engine, tokenizer, eval_problems, verifier, args, rank, world, log)
    if start_step == 0:
        run_eval(0)
    total_steps = algo.warmup_steps + args.steps
    # resumed from a run's final (budget-stopped) checkpoint
    if args.token_budget and generated_total >= args.token_budget:
        total_steps = start_step
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not master,
               desc=type(algo).__name__)
    for step in bar:
        t_step, actor_trains = time.time(), step >= algo.warmup_steps  # warm-up: only the algorithm's own model trains
        problems = stream.next_batch(local_prompts * world)[rank * local_prompts:(rank + 1) * local_prompts]
        prompt_ids = [format_prompt(tokenizer, p) for p in problems]
        times = {}

        # 1. generate + score: the algorithm decides how many rollouts each prompt gets
        t = time.time()
        engine.wake()  # awake since the last sync (no-op); after an evaluation too
        stats = {"score_timeouts": 0, "empty_responses": 0, "truncated": 0, "time/score": 0.0}
        generate = functools.partial(generate_and_score, engine, problems, prompt_ids, args, verifier, stats)
        samples, rewards, m_sample = algo.sample(problems, prompt_ids, generate,
                                                 seed=args.seed * 1_000_003 + step * 7 + rank)
        # GPU memory to the trainer until the sync: level 2 drops the weights the sync replaces; a warm-up step (the
        # actor does not change) keeps them in host RAM (level 1). GenAC's judge wakes it for the critic.
        engine.sleep(level=2 if actor_trains else 1)
        times["time/generate"], times["time/score"] = time.time() - t - stats["time/score"], stats["time/score"]
        batch = build_rollout_batch(prompt_ids, samples, rewards, pad_id)
        batch.extras["step"] = step

        # 2. hidden features (POISE) need a no-grad pass before the advantages; otherwise the update takes the old
        #    log-probs and entropies from its own first forward (actor.ppo_update) and passes over later mini-batches
        #    only
        t, m_old = time.time(), {}
        model.eval()
        if actor_trains and algo.hidden_features is not None:
            m_old = compute_old_logprobs(model, batch, args, device, algo.hidden_features)
        elif not actor_trains:  # the frozen actor of a warm-up iteration needs none
            batch.old_logprobs = batch.entropies = torch.zeros_like(batch.response_mask)
        times["time/old_logprob"] = time.time() - t

        # 3. advantages
        t = time.time()
        batch.advantages, m_algo = algo.advantages(batch, problems)  # [N, R]
        times["time/advantage"] = time.time() - t

        # 4. update the actor, then whatever the algorithm trains on the same batch
        t = time.time()
        model.train()
        m_update = (ppo_update(model, optimizer, batch, args, device, world, ref_model,
                               token_losses=getattr(algo, "token_losses", None)) if actor_trains else {})
        seconds_old = m_update.pop("time/old_logprob", 0.0)  # the no-grad pass over later mini-batches
        times["time/old_logprob"] += seconds_old
        times["time/update"] = time.time() - t - seconds_old
        m_after = algo.after_update(batch)

        # 5. sync the new weights into the engine
        t = time.time()
        if actor_trains or engine.holder != "actor":  # new actor weights, or the critic's were swapped in (GenAC)
            engine.wake(["weights"])  # TRL/verl order: weights, load, then the KV cache (not mapped during the load)
            weights = stream_full_parameters(model, args.sync_bucket_mb, engine.dtype)  # a bucket at a time
            engine.load_weights(weights, holder="actor")
        engine.wake()  # the KV cache (level 1: the weights too) for the evaluation and the next generation
        times["time/sync"], times["time/step"] = time.time() - t, time.time() - t_step

        # 6. log, evaluate, checkpoint
        record = {"step": step + 1, "phase": "rl" if actor_trains else "warmup",
                  **rollout_metrics(batch, stats, actor_trains), **m_update, **times, **m_old, **m_sample, **m_algo,
                  **m_after}
        generated_total += record["generated_tokens"]
        record.update({"tokens_per_s/generate": record["generated_tokens"] / max(times["time/generate"], 1e-9),
                       "tokens_per_s/train": record["trained_tokens"] / max(times["time/update"], 1e-9),
                       "generated_tokens_total": generated_total})
        log(record)
        bar.set_postfix(reward=f"{record['reward']:.3f}", len=f"{record['response_length']:.0f}",
                        s=f"{record['time/step']:.0f}")
        if args.token_budget and generated_total >= args.token_budget and step + 1 < total_steps:
            if master:
                print(f"[budget] {generated_total} generated tokens >= --token-budget {args.token_budget}; "
                      f"stopping after step {step + 1}", flush=True)
            total_steps = step + 1
            break
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total_steps:
            run_eval(step + 1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(out, step + 1, model, optimizer, tokenizer, stream, algo, rank, args.keep_checkpoints,
                            generated_total)

    if start_step < total_steps:
        run_eval(total_steps)
        final = save_checkpoint(out, total_steps, model, optimizer, tokenizer, stream, algo, rank,
                                args.keep_checkpoints, generated_total, final=True)  # + the Hugging Face weights
        if master:
            print(f"[done] {total_steps} steps; checkpoint {final}; metrics {metrics_path}; "
                  f"plots: python eval.py plot {out}", flush=True)
    if master:  # the completion marker, after the final evaluation and checkpoint (tools/sweep.py skips such runs)
        mark_done(out, total_steps, generated_total)
    for closable in (verifier, engine, algo, trackers):
        if closable is not None:
            closable.close()
    if dist.is_initialized():
        dist.barrier()  # no rank tears gloo down while another still uses it
        dist.destroy_process_group()


def append_jsonl(path: Path, record: dict, trackers: Trackers | None = None) -> None:
    """One line of metrics.jsonl (the source of truth), then the same record to each --report-to tracker."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if trackers is not None:
        trackers.log(record)


def evaluate_heldout(engine, tokenizer, eval_problems: list[Problem], verifier, args, rank: int, world: int, log,
                     step: int) -> None:
    """avg@k and pass@k on the held-out problems (each rank its share), logged and printed."""
    if not eval_problems or args.no_eval:
        return
    t = time.time()
    result = evaluate(engine, tokenizer, eval_problems[rank::world], args.eval_k, args.max_new_tokens, verifier,
                      seed=args.seed + 17)
    totals = all_reduce(torch.tensor([result["correct_sum"], result["samples"], result["pass_at_k_sum"],
                                      result["problems"], result["generated_tokens"], result["timeouts"]],
                                     dtype=torch.float64))
    record = {"step": step, "eval/avg_at_k": float(totals[0] / totals[1]),
              "eval/pass_at_k": float(totals[2] / totals[3]), "eval/k": args.eval_k, "eval/problems": int(totals[3]),
              "eval/generated_tokens": int(totals[4]), "eval/timeouts": int(totals[5]), "time/eval": time.time() - t}
    log(record)
    if rank == 0:
        print(f"[eval] step {step}: avg@{args.eval_k} {record['eval/avg_at_k']:.4f} "
              f"({record['eval/timeouts']} timeouts, scored 0)  "
              f"pass@{args.eval_k} {record['eval/pass_at_k']:.4f} on {record['eval/problems']} held-out problems "
              f"({record['time/eval']:.0f}s)", flush=True)


if __name__ == "__main__":
    main(start=START)  # START: check_start's, made before the heavy imports
