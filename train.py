"""The one training loop: generate (vLLM) -> score -> old log-probs -> advantages -> update -> sync.

Every algorithm is PPO with its own advantage (verl's framing; --clip-high 0.28 on any is DAPO's clip-higher) and,
if it wants, its own per-token loss. `--algo` picks one entry of ALGORITHMS (flags.py: name -> "module.Class"), and
the loop never asks which one it got:

    grpo   (r - mean) / (std + 1e-6) per prompt group; --no-std gives Dr.GRPO        advantage.py
    rloo   r_i - mean_{j != i} r_j                                                     advantage.py
    ppo    discriminative critic V_t, token-level GAE, batch-whitened                 critic.py
    vcppo  ppo after 6 iterations of value pretraining on the frozen actor            critic.py
    genac  generative critic judges each segment's state in text, ICC hints, GAE       genac.py
    v05    generalist value prior fused with sparse rollouts, OSLA extra rollouts     prior.py
    poise  hidden-state probe, cross-rollout baselines, 2 rollouts per prompt         probe.py

The algorithm interface (every class in ALGORITHMS has these; advantage.GRPO is the shortest example). The loop owns
every side effect (the engine, scoring, the actor's passes, logging, checkpoints) and hands the algorithm what it needs
in a rollout.Step, once per iteration: its index and seed, generate(counts, seed), actor_passes(batch, layer), the
engine, the rank and world, the collectives (all_reduce, all_gather) and the update (update.ppo_update, for any model):

    add_arguments(parser)            static: its own flags, and its defaults for shared ones (parser.set_defaults)
    check_arguments(args)            static, at parse time: raise ValueError naming a bad flag (one line); may fill
                                     defaults that depend on other flags (GenAC's cpu/paper profile follows --model).
                                     Both come from its torch-free flags class in algo_flags.py (with model_flags,
                                     resume_fixed, checkpoint_files: what a start checks), which it inherits
    __init__(args, actor, tokenizer, device, world, checkpoint)
                                     its state: critic, prior or probe (checkpoint: the folder resumed from, or None)
    warmup_steps: int                iterations before RL that train only the algorithm's own model (VC-PPO: 6)
    memory_parts                     what the memory plan (memory.py) counts beside the actor: a subset of
                                     {'value critic', 'generative critic', 'prior embedder', 'hidden states'}
    sample(problems, prompt_ids, step) -> (samples[prompt][i], flat rewards, metrics, extras)
                                     how it samples, through step.generate(counts per prompt, seed); `extras` go into
                                     batch.extras for its later methods (V0.5's fused baselines)
    advantages(batch, problems, step) -> (token advantages [N, R], metrics)
                                     may read the actor's hidden states through step.actor_passes (POISE) and leave
                                     what its after_update needs in the batch (PPO's returns, GenAC's judged states)
    after_update(batch, step) -> metrics
                                     after the actor's update: critic step, prior update (none for GRPO)
    state_dict() / load_state_dict(state), save(folder), close()
                                     small checkpoint state (rank 0's goes into trainer_state.pt; load_state_dict
                                     refuses a state made with other settings, naming the flag), its models' shards,
                                     its own engines
    token_losses(logp, old_logp, advantages, mask, settings) -> (losses [b, R], clipped [b, R] bool)
                                     OPTIONAL: the actor's per-token loss (default: PPO-clip with verl's guards,
                                     update.ppo_clip_losses), aggregated by --loss-agg (set its default in
                                     add_arguments). tests/test_loss_interface.py changes the ratio this way
    engine_max_model_len             OPTIONAL: the context it needs on the loop's engine (GenAC's critic judges there)

A start checks, then writes (a bad input stops with ONE line and leaves every file as it was):
    check_start             before torch is imported: flags, data files, models named by a path, --out (writable;
                            on --resume: the run recorded there is this algorithm's and this model's), trackers
    start_run               prompt lengths (the tokenizer), the resumed checkpoint's files, the memory plan (it fills
                            the flags left unset: flags.fill_planned_flags), then the models, the algorithm (a resumed
                            state made with other settings is refused here) and the engine
    main                    the run folder and run.json, then the loop

One step of the loop (`run_step`):
    1. generate + score     algo.sample(...) drives the engine through step.generate (`generate_and_score`)
    2. advantages           algo.advantages(batch, problems, step)
    3. update               update.ppo_update (skipped during warm-up), then algo.after_update(batch, step)
    4. sync                 the new weights into the engine (engine.serve)
    5. log                  metrics.jsonl, evaluation every --eval-every, checkpoints every --save-every

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
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from data import DataError, Problem, format_prompt, load_problems
from flags import algorithm_class, algorithm_flags, context_error, fill_planned_flags, model_error, parse_train_args
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

from actor import adamw, load_actor, old_logprob_passes, stream_full_parameters
from checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state, save_checkpoint
from collectives import all_gather_objects, all_reduce, check_shared_out, setup_distributed
from data import PromptStream
from engine import default_engine, make_engine, quiet_third_party_output, serve, serving
from memory import device_capacity_gb, run_plan
from rollout import (Step, build_rollout_batch, evaluate_heldout, generate_and_score, resolve_model_path,
                     rollout_metrics)
from update import UpdateSettings, ppo_update
from verifier import MathVerifier


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class Run:
    """The objects of a run, built once by `start_run`; `run_step` reads them (the algorithm reads its Step)."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    tokenizer: object
    pad_id: int
    model: torch.nn.Module
    ref_model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    settings: UpdateSettings  # what the actor's update reads
    algo: object
    engine: object
    verifier: MathVerifier | None
    stream: PromptStream


def main(argv=None, start=None) -> None:
    """A run: the checks (check_start, or `start` when the script's __main__ block made them), loading, the loop.
    Nothing is written until everything is loaded and the engine is built: a start that fails leaves every file
    as it was, and no run folder where there was none."""
    args, train_problems, eval_problems = start or check_start(argv)
    quiet_third_party_output()
    rank, world, device = setup_distributed(args.dist_timeout)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    run, resume_from, start_step, generated_total = start_run(args, train_problems, eval_problems, rank, world, device)
    out, master = Path(args.out), rank == 0
    # The run can start: the first bytes it writes. run.json (args, versions, git commit, model and data hashes; a
    # --resume appends to it) in a folder that every rank must see (check_shared_out)
    if master:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # check_start found it writable: changed since, or refused beyond permissions
            sys.exit(f"train.py: error: --out {out}: cannot create it ({e.strerror or e}); choose another --out")
    check_shared_out(out, rank, world)
    if master:
        write_start(out, args, sys.argv[1:] if argv is None else argv, resolve_model_path(args.model), train_problems,
                    eval_problems, device, world)
    metrics_path = out / "metrics.jsonl"
    if master and (resume_from or not args.resume):  # --resume without a checkpoint: the file as it is
        keep_logged_steps(metrics_path, start_step if resume_from else None)
    # --report-to: the same records to TensorBoard / wandb / trackio too, with run.json as their run config
    trackers = Trackers(args.report_to, out, load_run_record(out), start_step, bool(resume_from)) if master else None
    log = functools.partial(append_jsonl, metrics_path, trackers=trackers) if master else lambda record: None
    run_eval = functools.partial(evaluate_heldout, run.engine, run.tokenizer, eval_problems, run.verifier, args, rank,
                                 world, log)
    if start_step == 0:
        run_eval(0)
    total_steps = run.algo.warmup_steps + args.steps
    if args.token_budget and generated_total >= args.token_budget:  # resumed from a budget-stopped final checkpoint
        total_steps = start_step
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not master,
               desc=type(run.algo).__name__)
    save = functools.partial(save_checkpoint, out, model=run.model, optimizer=run.optimizer, tokenizer=run.tokenizer,
                             stream=run.stream, algo=run.algo, rank=rank, keep=args.keep_checkpoints)
    for step in bar:
        record = run_step(run, step)
        generated_total += record["generated_tokens"]
        record["generated_tokens_total"] = generated_total
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
            save(step=step + 1, generated_total=generated_total)
    if start_step < total_steps:
        run_eval(total_steps)
        final = save(step=total_steps, generated_total=generated_total, final=True)  # + the Hugging Face weights
        if master:
            print(f"[done] {total_steps} steps; checkpoint {final}; metrics {metrics_path}; "
                  f"plots: python eval.py plot {out}", flush=True)
    if master:  # the completion marker, after the final evaluation and checkpoint (tools/sweep.py skips such runs)
        mark_done(out, total_steps, generated_total)
    for closable in (run.verifier, run.engine, run.algo, trackers):
        if closable is not None:
            closable.close()
    if dist.is_initialized():
        dist.barrier()  # no rank tears gloo down while another still uses it
        dist.destroy_process_group()


def start_run(args, train_problems: list[Problem], eval_problems: list[Problem], rank: int, world: int, device):
    """Everything before the run's first byte: what needs the tokenizer or torch (prompt lengths, the resumed
    checkpoint, the memory plan), then the actor, the algorithm and the engine. -> (Run, the checkpoint resumed
    from or None, its step, its generated tokens)."""
    master, out = rank == 0, Path(args.out)
    try:
        base_model = resolve_model_path(args.model)
    except FileNotFoundError as e:  # the offline default's package missing (a path was checked by check_start)
        sys.exit(f"train.py: error: {e}")
    resume_from = latest_checkpoint(out) if args.resume else None
    resume_state = (read_trainer_state(resume_from, out, algorithm_flags(args.algo).checkpoint_files)
                    if resume_from else None)
    tokenizer = AutoTokenizer.from_pretrained(str(resume_from) if resume_from else base_model)
    check_prompt_lengths(args, tokenizer, train_problems, eval_problems)
    if args.model is None and (message := context_error(base_model, args)):  # a given folder: check_start's
        sys.exit(f"train.py: error: {message}")
    # The memory plan, before anything loads (memory.py): the flags left unset, chosen for this device; on a GPU (or
    # with --gpu-gb) it stops a run that would not fit, naming the phase, the bytes over and the flag to change
    critic = getattr(args, "critic_model", None)
    line, planned = run_plan(args, world, args.gpu_gb or device_capacity_gb(device),
                             resolve_model_path(critic) if critic else None, device.type, model_path=base_model)
    fill_planned_flags(args, planned)
    if master:
        print(line, file=sys.stderr, flush=True)
        print(data_line(args, train_problems, eval_problems), file=sys.stderr)
    model = load_actor(base_model, device, world, args)  # a resumed run's shards are read over it (load_checkpoint)
    ref_model = load_actor(base_model, device, world, args).eval() if args.kl_coef > 0 else None
    optimizer = adamw(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
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
    # ONE engine per process (engine.VLLMEngine): the actor generates on it, GenAC's critic judges on it with its
    # weights swapped in, so it holds the longer of their contexts (algo.engine_max_model_len)
    max_model_len = max(args.max_prompt_tokens + args.max_new_tokens, getattr(algo, "engine_max_model_len", 0))
    engine = make_engine(args.engine or default_engine(), base_model, dtype=args.engine_dtype,
                         seed=args.seed + 1000 * rank, max_model_len=max_model_len,
                         gpu_memory_utilization=args.gpu_memory_utilization, world_size=world,
                         max_num_seqs=args.engine_max_num_seqs,
                         max_num_batched_tokens=args.engine_max_num_batched_tokens, device_type=device.type)
    if resume_from:  # the engine starts from the base weights: give it the resumed ones
        serve(engine, stream_full_parameters(model, args.sync_bucket_mb, engine.dtype), "actor")
    verifier = (MathVerifier(timeout_s=args.verifier_timeout)
                if any(p.kind == "math" for p in train_problems + eval_problems) else None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    run = Run(args, rank, world, device, tokenizer, pad_id, model, ref_model, optimizer, UpdateSettings.of(args),
              algo, engine, verifier, stream)
    return run, resume_from, start_step, generated_total


def run_step(run: Run, step: int) -> dict:
    """One iteration: generate + score -> old log-probs -> advantages -> update -> sync. -> its metrics record."""
    args, algo, engine, model = run.args, run.algo, run.engine, run.model
    t_step, actor_trains = time.time(), step >= algo.warmup_steps  # warm-up: only the algorithm's own model trains
    local_prompts = args.prompts_per_step // run.world
    problems = run.stream.next_batch(local_prompts * run.world)[run.rank * local_prompts:(run.rank + 1) * local_prompts]
    prompt_ids = [format_prompt(run.tokenizer, p) for p in problems]
    stats = {"score_timeouts": 0, "empty_responses": 0, "truncated": 0, "time/score": 0.0}
    ctx = Step(index=step, seed=args.seed * 1_000_003 + step * 7 + run.rank, rank=run.rank, world=run.world,
               generate=functools.partial(generate_and_score, engine, problems, prompt_ids, args, run.verifier, stats),
               actor_passes=functools.partial(old_logprob_passes, model, settings=run.settings, device=run.device),
               engine=engine, all_reduce=all_reduce, all_gather=all_gather_objects, update=ppo_update)
    times = {}

    # 1. generate + score: the algorithm decides how many rollouts each prompt gets. Then the GPU memory goes to the
    #    trainer until the sync: level 2 drops the weights the sync replaces; a warm-up step (the actor does not
    #    change) keeps them in host RAM (level 1)
    t = time.time()
    with serving(engine, sleep_level=2 if actor_trains else 1):
        samples, rewards, m_sample, extras = algo.sample(problems, prompt_ids, ctx)
    times["time/generate"], times["time/score"] = time.time() - t - stats["time/score"], stats["time/score"]
    batch = build_rollout_batch(prompt_ids, samples, rewards, run.pad_id)
    batch.extras.update(extras)

    # 2. advantages; the actor's no-grad pass (eval mode) runs where an algorithm reads its hidden states (POISE, in
    #    `advantages`, through step.actor_passes), else the update takes the old log-probs from its own first forward
    t = time.time()
    model.eval()
    if not actor_trains:  # the frozen actor of a warm-up iteration needs none
        batch.old_logprobs = batch.entropies = torch.zeros_like(batch.response_mask)
    batch.advantages, m_algo = algo.advantages(batch, problems, ctx)  # [N, R]
    times["time/advantage"] = time.time() - t

    # 3. update the actor, then whatever the algorithm trains on the same batch
    t = time.time()
    model.train()
    m_update = (ppo_update(model, run.optimizer, batch, run.settings, run.device, run.world, run.ref_model, step=step,
                           token_losses=getattr(algo, "token_losses", None)) if actor_trains else {})
    times["time/old_logprob"] = m_update.pop("time/old_logprob", 0.0)  # the no-grad pass over later mini-batches
    times["time/update"] = time.time() - t - times["time/old_logprob"]
    m_after = algo.after_update(batch, ctx)

    # 4. sync: the new actor weights into the engine, or the actor's back where the critic's were served (GenAC)
    t = time.time()
    if actor_trains or engine.holder != "actor":  # serve leaves it awake
        serve(engine, stream_full_parameters(model, args.sync_bucket_mb, engine.dtype), "actor")
    else:  # a warm-up step: the level-1 sleep kept the actor's weights; the KV cache back for the next generation
        engine.wake()
    times["time/sync"], times["time/step"] = time.time() - t, time.time() - t_step

    # 5. the step's record
    record = {"step": step + 1, "phase": "rl" if actor_trains else "warmup",
              **rollout_metrics(batch, stats, actor_trains), **m_update, **times, **m_sample, **m_algo, **m_after}
    record.update({"tokens_per_s/generate": record["generated_tokens"] / max(times["time/generate"], 1e-9),
                   "tokens_per_s/train": record["trained_tokens"] / max(times["time/update"], 1e-9)})
    return record


def check_prompt_lengths(args, tokenizer, train_problems: list[Problem], eval_problems: list[Problem]) -> None:
    """Stop (one line) on the first prompt longer than --max-prompt-tokens, naming the file and the problem."""
    sources = ((train_problems, "--data", args.data),
               (eval_problems, "--eval-data" if args.eval_data else "--data", args.eval_data or args.data))
    too_long = next(((p, n, flag, spec) for problems, flag, spec in sources for p in problems
                     if (n := len(format_prompt(tokenizer, p))) > args.max_prompt_tokens), None)
    if too_long:
        problem, n, flag, spec = too_long
        sys.exit(f"train.py: error: {flag} {spec}: problem {problem.id!r} has a {n}-token prompt, over "
                 f"--max-prompt-tokens {args.max_prompt_tokens}; raise --max-prompt-tokens or shorten that problem")


def data_line(args, train_problems: list[Problem], eval_problems: list[Problem]) -> str:
    """Which rows train and which are held out."""
    if args.eval_data:
        held_out = f"{len(eval_problems)} of {args.eval_data} (--eval-data)"
    elif args.data.startswith("arithmetic"):
        held_out = f"{len(eval_problems)} of the arithmetic task's held-out split (disjoint by a hash of the text)"
    else:
        held_out = "none (a file has no held-out split: pass --eval-data FILE)"
    return (f"[data] train: {len(train_problems)} problems of {args.data}; held-out: {held_out}"
            + (", not evaluated (--no-eval)" if args.no_eval else ""))


def keep_logged_steps(metrics_path: Path, last_step: int | None) -> None:
    """A fresh run (None) starts metrics.jsonl empty; a resumed one drops the lines logged past its checkpoint (a run
    killed after logging them), through a temporary file renamed into place."""
    if last_step is None:
        metrics_path.unlink(missing_ok=True)
    elif metrics_path.exists():
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        metrics_path.with_suffix(".tmp").write_text("".join(line + "\n" for line in kept))
        os.replace(metrics_path.with_suffix(".tmp"), metrics_path)


def append_jsonl(path: Path, record: dict, trackers: Trackers | None = None) -> None:
    """One line of metrics.jsonl (the source of truth), then the same record to each --report-to tracker."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if trackers is not None:
        trackers.log(record)


if __name__ == "__main__":
    main(start=START)  # START: check_start's, made before the heavy imports
