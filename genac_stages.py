"""GenAC's critic training pipeline (arXiv:2604.10701 §5.2): the stages before joint training.

    1. sft       a teacher model answers the ICC prompt for states of held-out prompts; the parseable answers
                 (the last \\boxed{0..10}) are a JSONL file; the critic is fine-tuned on them (cross-entropy)
    2. pretrain  RL pretraining with the actor frozen: fresh actor rollouts -> segments -> the critic judges
                 them -> REINFORCE on R_v = 1 - (r - v)^2, exactly GenAC's critic step (genac.GenAC), until the
                 value MSE on held-out states (ground truth: mean reward of M continuations) stops falling
    3. joint     python train.py --algo genac --critic OUT/critic
    explain      one response's segments, the critic's value of each state and the advantages, printed

Held-out prompts: pretrain validates on the first --val-n (32); sft takes its -n after the first --skip (32), so no
SFT state is a validation state. tau carries over from stage to stage (--icc-carry-over is on here; in train.py
it starts at 0, Alg. 1 l. 1). Defaults follow --actor as in train.py (GenAC.check_arguments: the cpu profile, its critic
answers guided to \\boxed{0..10}, or the paper profile, free answers; --critic-guided / --no-critic-guided choose).

    python genac_stages.py sft --teacher MODEL --out runs/genac-sft
    python genac_stages.py pretrain --critic runs/genac-sft/critic --out runs/genac-pretrain
    python genac_stages.py explain --critic runs/genac-pretrain/critic
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from actor import policy_forward, stream_full_parameters
from data import DataError, format_prompt, load_problems
from engine import Sample, make_engine
from flags import add_update_arguments
from genac import GenAC, critic_reward
from genac_segments import critic_state_prefixes, segment_boundaries, token_texts
from rollout import Step, build_rollout_batch, resolve_model_path
from update import optimizer_steps, ppo_update
from verifier import MathVerifier, score_responses



def _stage_arguments(prog: str, doc: str, out_default: str) -> argparse.ArgumentParser:
    """train.py's flags that the stages need (same names, same meaning), the update's flags and GenAC's."""
    p = argparse.ArgumentParser(prog=f"genac_stages.py {prog}", description=doc)
    a = p.add_argument
    a("--model", "--actor", dest="model", default=None,
      help="the actor whose values the critic learns (default: offline SmolLM2-135M)")
    a("--data", default="arithmetic", help="'arithmetic[:levels]' or a JSONL file")
    a("--eval-data", default=None,
      help="held-out problems for the states (needed when --data is a file: it has no held-out split)")
    a("--problem-key", default="problem")
    a("--answer-key", default="answer")
    a("--out", default=out_default, help="where the critic folder and the stage's metrics go")
    a("--seed", type=int, default=0)
    a("--max-new-tokens", type=int, default=128, help="the actor's response budget")
    a("--max-prompt-tokens", type=int, default=512, help="the actor's prompt allowance (sizes the critic's prompts)")
    a("--engine", default="vllm", choices=("vllm", "hf"))
    a("--engine-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    a("--gpu-memory-utilization", type=float, default=0.2)
    add_update_arguments(p)
    GenAC.add_arguments(p)
    # tau carries over from sft to pretrain (train.py: fresh by default)
    p.set_defaults(micro_batch_size=8, icc_carry_over=True)
    return p


def _parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, then GenAC.check_arguments (bad flags; the cpu/paper profile defaults, from --model as given)."""
    args = p.parse_args(argv)
    try:
        GenAC.check_arguments(args)
    except ValueError as e:
        p.error(str(e))
    return args


def heldout_problems(args) -> list:
    """--eval-data's problems, or --data's held-out split (the arithmetic task has one); exits naming the problem."""
    try:
        if args.eval_data:
            return load_problems(args.eval_data, "benchmark", args.seed, args.problem_key, args.answer_key)
        return load_problems(args.data, "heldout", args.seed, args.problem_key, args.answer_key)
    except DataError as e:
        sys.exit(f"error: {e}")


def _frozen_actor_and_critic(args, split: str):
    """-> (problems of `split`, actor tokenizer, actor engine, GenAC critic, verifier). One process."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    try:
        problems = (heldout_problems(args) if split == "heldout"
                    else load_problems(args.data, split, args.seed, args.problem_key, args.answer_key))
        actor_path = resolve_model_path(args.model)
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    tokenizer = AutoTokenizer.from_pretrained(actor_path)
    engine = make_engine(args.engine, actor_path, dtype=args.engine_dtype, seed=args.seed,
                         max_model_len=args.max_prompt_tokens + args.max_new_tokens,
                         gpu_memory_utilization=args.gpu_memory_utilization, sleep_mode=False)  # stages never sleep it
    with torch.device("meta"):  # the actor's parameter count for the ICC hint, without loading its weights
        actor = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(actor_path))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        critic = GenAC(args, actor, tokenizer, device, 1)
    except ValueError as e:  # the critic's context cannot hold its prompts
        sys.exit(f"error: {e}")
    verifier = MathVerifier() if not args.data.startswith("arithmetic") else None
    return problems, tokenizer, engine, critic, verifier


def _rollout_states(engine, tokenizer, problems, verifier, args, seed: int, samples_per_problem: int = 1):
    """The actor answers each problem once; each response is cut into states. -> (rewards, states), a state
    {"problem", "prompt_ids", "prefix_ids", "partial_response", "actor_reward"}."""
    prompt_ids = [format_prompt(tokenizer, p) for p in problems]
    outs = engine.generate(prompt_ids, samples_per_problem, args.max_new_tokens, 1.0, 1.0, seed)
    flat = [(p, ids, s) for p, ids, group in zip(problems, prompt_ids, outs) for s in group]
    rewards, _ = score_responses([s.text for _, _, s in flat], [p for p, _, _ in flat], verifier,
                                 [s.finish_reason for *_, s in flat])
    states = []
    for (p, ids, s), r in zip(flat, rewards):
        ends = segment_boundaries(token_texts(tokenizer, s.token_ids), args.segment_tokens, args.max_segments) or [0]
        for prefix in critic_state_prefixes(s.token_ids, ends):
            states.append({"problem": p.problem, "prompt_ids": ids, "prefix_ids": prefix, "actor_reward": r,
                           "partial_response": tokenizer.decode(prefix, skip_special_tokens=True), "gold": p})
    return rewards, states


def critic_quality(critic: GenAC, states: list[dict], seed: int) -> dict:
    """Parse rate and mean critic reward R_v on `states` (one answer each), free and (when the engine can) guided."""
    report = {"states": len(states)}
    for name, guided in (("", False), ("guided_", True)):
        if guided and not critic.engine.supports_regex:
            continue
        _, _, parsed = critic.judge([s["problem"] for s in states], [s["partial_response"] for s in states], seed,
                                    guided=guided)
        report[name + "parse_rate"] = sum(v is not None for v in parsed) / len(parsed)
        report[name + "critic_reward"] = (sum(critic_reward(s["actor_reward"], v) for s, v in zip(states, parsed))
                                          / len(parsed))
    return report


def sft_parser() -> argparse.ArgumentParser:
    p = _stage_arguments("sft", sft_main.__doc__, "runs/genac-sft")
    p.add_argument("--teacher", default=None,
                   help="any model the engine loads (default: the critic's start = the actor)")
    p.add_argument("-n", type=int, default=64, help="held-out prompts whose responses give the states")
    p.add_argument("--skip", type=int, default=32, help="held-out prompts skipped first: pretrain's validation prompts "
                   "(its --val-n, default 32), so SFT states are never validation states")
    p.add_argument("--teacher-samples", type=int, default=4, help="teacher answers per state")
    p.add_argument("--sft-data", default=None,
                   help="JSONL of teacher answers: reused if it exists (default: OUT/sft.jsonl)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--sft-lr", type=float, default=1e-5)
    p.add_argument("--val-frac", type=float, default=0.25, help="prompts whose states are held out to measure "
                   "parse rate / critic reward (split by prompt)")
    p.add_argument("--no-guided-teacher", action="store_true",
                   help="let the teacher answer freely (default: constrained to end in \\boxed{0..10}, "
                   "since small teachers rarely follow the format)")
    return p


def sft_prompts(heldout: list, args) -> list:
    """The held-out prompts whose states SFT uses: -n of them after the first --skip."""
    return heldout[args.skip: args.skip + args.n]


def validation_prompts(heldout: list, args) -> list:
    """The held-out prompts whose states pretrain validates on: the first --val-n."""
    return heldout[: args.val_n]


def split_states_by_prompt(states: list[dict], val_frac: float, seed: int) -> tuple[list[dict], list[dict]]:
    """-> (validation states, training states), split by PROMPT: every state of a prompt falls on one side, so the
    held-out parse rate and critic reward are measured on prompts SFT never saw (a split by state puts the states
    of one response on both sides). A seeded shuffle of the prompts; at least one on each side when there are two."""
    prompts = list(dict.fromkeys(s["problem"] for s in states))  # in order of appearance, each once
    random.Random(seed).shuffle(prompts)
    n_val = min(max(1, round(len(prompts) * val_frac)), max(len(prompts) - 1, 1))
    held_out = set(prompts[:n_val])
    return [s for s in states if s["problem"] in held_out], [s for s in states if s["problem"] not in held_out]


def sft_main(argv: list[str]) -> None:
    """Stage 1: a teacher answers the ICC prompt for states of held-out prompts; parseable answers -> JSONL -> SFT."""
    args = _parse(sft_parser(), argv)
    problems, tokenizer, engine, critic, verifier = _frozen_actor_and_critic(args, "heldout")
    for group in critic.optimizer.param_groups:  # SFT's learning rate, not the RL one (--critic-lr)
        group["lr"] = args.sft_lr
    teacher = resolve_model_path(args.teacher or args.critic_model or args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sft_path = Path(args.sft_data or out / "sft.jsonl")
    chosen = sft_prompts(problems, args)
    if not chosen:
        sys.exit(f"error: no held-out prompts after --skip {args.skip} ({len(problems)} held out)")
    rewards, states = _rollout_states(engine, tokenizer, chosen, verifier, args, args.seed)
    critic.success_rate.update(rewards)  # tau: the actor's success rate on these prompts
    val_states, train_states = split_states_by_prompt(states, args.val_frac, args.seed)
    print(f"[sft] {len(states)} states from held-out prompts [{args.skip}, {args.skip + len(chosen)}) "
          f"(actor success rate {critic.fallback_value():.2f}); {len(val_states)} states of other prompts held out",
          file=sys.stderr)
    if sft_path.is_file():
        rows = [json.loads(line) for line in sft_path.read_text().splitlines() if line.strip()]
        print(f"[sft] reusing {len(rows)} teacher answers from {sft_path}", file=sys.stderr)
    else:
        own_engine = critic.engine
        if teacher != resolve_model_path(args.critic_model or args.model):  # the teacher answers through its own engine
            critic.engine = make_engine(args.engine, teacher, dtype=args.engine_dtype, seed=args.seed + 3,
                                        max_model_len=critic.max_model_len, sleep_mode=False)
        rows, asked = [], 0
        for j in range(args.teacher_samples):
            prompts, samples, parsed = critic.judge([s["problem"] for s in train_states],
                                                    [s["partial_response"] for s in train_states],
                                                    args.seed + 100 + j, guided=not args.no_guided_teacher)
            asked += len(samples)
            rows += [{"prompt_ids": q, "response": s.text, "response_ids": s.token_ids, "value": v,
                      "actor_reward": st["actor_reward"], "problem": st["problem"],
                      "partial_response": st["partial_response"]}
                     for st, q, s, v in zip(train_states, prompts, samples, parsed) if v is not None]
        if critic.engine is not own_engine:
            critic.engine.close()
            critic.engine = own_engine
        tmp = sft_path.with_name(sft_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, sft_path)
        print(f"[sft] teacher {teacher}: {len(rows)}/{asked} answers parse -> {sft_path}", file=sys.stderr)
    if not rows:
        sys.exit("error: no teacher answer parsed; try another --teacher or more --teacher-samples")
    before = critic_quality(critic, val_states, args.seed + 7)
    metrics = supervised_finetune(critic, rows, args)
    critic.engine.load_weights(stream_full_parameters(critic.model, args.sync_bucket_mb, critic.engine.dtype))
    report = {"stage": "sft", "teacher": teacher, "teacher_guided": not args.no_guided_teacher, "sft_rows": len(rows),
              "before": before, "after": critic_quality(critic, val_states, args.seed + 7), **metrics}
    critic.save(out, optimizer=False)  # a model folder for --critic
    (out / "sft_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"[sft] critic -> {out / 'critic'}; "
          f"next: python genac_stages.py pretrain --critic {out / 'critic'} --out ...", file=sys.stderr)
    critic.close(), engine.close()


def supervised_finetune(critic: GenAC, rows: list[dict], args) -> dict:
    """Cross-entropy on the teacher's answer tokens given the ICC prompt, token-mean per optimizer step."""
    from tqdm import tqdm
    batch = build_rollout_batch([r["prompt_ids"] for r in rows],
                                [[Sample(r["response_ids"], [0.0] * len(r["response_ids"]), r["response"], "stop")]
                                 for r in rows],
                                [0.0] * len(rows), critic.pad_id)
    order, losses = list(range(len(rows))), []
    steps_per_epoch = max(1, len(rows) // (args.micro_batch_size * 2))
    critic.model.train()
    for epoch in range(args.epochs):
        random.Random(args.seed + epoch).shuffle(order)
        for chunk in tqdm([order[i::steps_per_epoch] for i in range(steps_per_epoch)], desc=f"sft epoch {epoch + 1}"):
            s = optimizer_steps(critic.model, critic.optimizer, batch, [torch.tensor(chunk)],
                                lambda model, mb: (-policy_forward(model, mb)[0], {}), args, critic.device, 1)
            losses.append(s["loss"])
    return {"sft_loss_first": losses[0], "sft_loss_last": losses[-1], "sft_steps": len(losses)}


def pretrain_parser() -> argparse.ArgumentParser:
    p = _stage_arguments("pretrain", pretrain_main.__doc__, "runs/genac-pretrain")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--rollouts-per-prompt", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=2, help="validation value MSE every N steps")
    p.add_argument("--patience", type=int, default=2, help="stop after this many evaluations without a lower MSE")
    p.add_argument("--val-n", type=int, default=32, help="held-out prompts whose states make the validation set")
    p.add_argument("--val-m", type=int, default=16, help="Monte-Carlo continuations per validation state")
    return p


def pretrain_main(argv: list[str]) -> None:
    """Stage 2: RL pretraining with the actor frozen; stops when the validation value MSE stops falling."""
    from tqdm import tqdm
    args = _parse(pretrain_parser(), argv)
    train_problems, tokenizer, engine, critic, verifier = _frozen_actor_and_critic(args, "train")
    val_problems = validation_prompts(heldout_problems(args), args)
    _, val = _rollout_states(engine, tokenizer, val_problems, verifier, args, args.seed)
    # segment starts: every one has budget left; its ground truth is the mean reward of M continuations
    open_states = val
    outs = engine.generate([s["prompt_ids"] + s["prefix_ids"] for s in open_states], args.val_m,
                           [args.max_new_tokens - len(s["prefix_ids"]) for s in open_states], 1.0, 1.0, args.seed + 2)
    texts = [tokenizer.decode(s["prefix_ids"] + c.token_ids, skip_special_tokens=True)
             for s, g in zip(open_states, outs) for c in g]
    truth, _ = score_responses(texts, [s["gold"] for s in open_states for _ in range(args.val_m)], verifier)
    truth = torch.tensor(truth).view(len(open_states), args.val_m).mean(1)  # [S]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def validation_mse() -> dict:
        _, _, parsed = critic.judge([s["problem"] for s in open_states], [s["partial_response"] for s in open_states],
                                    args.seed + 11, 0.6)
        values = torch.tensor([critic.fallback_value() if v is None else v for v in parsed])  # [S]
        return {"val/mse": float(((values - truth) ** 2).mean()),
                "val/parse_failures": sum(v is None for v in parsed) / len(parsed)}

    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    log = lambda row: metrics_path.open("a").write(json.dumps(row) + "\n")  # noqa: E731
    first = validation_mse()
    log({"step": 0, **first})
    print(f"[pretrain] step 0: value MSE {first['val/mse']:.4f} on {len(open_states)} states", file=sys.stderr)
    best, waited = first["val/mse"], 0
    critic.save(out, optimizer=False)  # a model folder for --critic
    rng = torch.Generator().manual_seed(args.seed)
    for step in tqdm(range(args.steps), desc="genac pretrain"):
        t0 = time.time()
        problems = [train_problems[i]
                    for i in torch.randint(len(train_problems), (args.prompts_per_step,), generator=rng).tolist()]
        prompt_ids = [format_prompt(tokenizer, q) for q in problems]
        samples = engine.generate(prompt_ids, args.rollouts_per_prompt, args.max_new_tokens, 1.0, 1.0,
                                  args.seed + 1000 + step)
        flat = [(q, s) for q, group in zip(problems, samples) for s in group]
        rewards, _ = score_responses([s.text for _, s in flat], [q for q, _ in flat], verifier,
                                     [s.finish_reason for _, s in flat])
        batch = build_rollout_batch(prompt_ids, samples, rewards, critic.pad_id)
        critic_step = Step(index=step, seed=args.seed + 2000 + step, generate=None, actor_passes=None, engine=None,
                           update=ppo_update)  # no loop engine: the critic judges on its own
        _, m = critic.segment_values(batch, problems, critic_step, critic_step.seed)
        m.update(critic.after_update(batch, critic_step))
        row = {"step": step + 1, "reward": sum(rewards) / len(rewards), **m, "time/step": time.time() - t0}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row.update(validation_mse())
            best, waited = (row["val/mse"], 0) if row["val/mse"] < best else (best, waited + 1)
            if waited == 0:
                critic.save(out, optimizer=False)  # keep the best critic
        log(row)
        print(f"[pretrain] step {step + 1}: parse rate {m['genac/parse_rate']:.2f} "
              f"critic reward {m['genac/critic_reward']:.3f}"
              + (f" value MSE {row['val/mse']:.4f}" if "val/mse" in row else ""), file=sys.stderr)
        if waited >= args.patience:
            print(f"[pretrain] value MSE has not fallen for {waited} evaluations: stopping", file=sys.stderr)
            break
    print(json.dumps({"stage": "pretrain", "value_mse_before": first["val/mse"], "value_mse_best": best,
                      "critic": str(out / "critic")}, indent=2))
    critic.close(), engine.close()


def explain_main(argv: list[str]) -> None:
    """A worked example: one response's segments, the critic's value of each state, and the advantages."""
    p = _stage_arguments("explain", explain_main.__doc__, "")
    p.add_argument("--problem-index", type=int, default=0, help="which held-out problem")
    args = _parse(p, argv)
    problems, tokenizer, engine, critic, verifier = _frozen_actor_and_critic(args, "heldout")
    problem = problems[args.problem_index]
    prompt_ids = [format_prompt(tokenizer, problem)]
    sample = max(engine.generate(prompt_ids, 4, args.max_new_tokens, 1.0, 1.0, args.seed)[0],
                 key=lambda s: len(s.token_ids))
    reward = score_responses([sample.text], [problem], verifier)[0][0]  # the longest of 4 samples: most segments
    batch = build_rollout_batch(prompt_ids, [[sample]], [reward], critic.pad_id)
    alone = Step(index=0, seed=args.seed + 1, generate=None, actor_passes=None, engine=None)  # the critic's engine
    values, m = critic.segment_values(batch, [problem], alone, seed=args.seed + 1)
    ends = segment_boundaries(token_texts(tokenizer, sample.token_ids), args.segment_tokens, args.max_segments)
    print(f"problem: {problem.problem}   (answer {problem.answer})\nreward r = {reward:.0f}    ICC success rate "
          f"tau = {critic.fallback_value():.2f}    parse failures {m['genac/parse_failures']}/{m['genac/states']}\n")
    for k, (s, e) in enumerate(zip([0] + ends[:-1], ends)):
        v, answer = float(values[0, s]), batch.extras["critic_states"]["samples"][k].text.strip().replace("\n", " ")
        print(f"segment {k + 1}: tokens [{s}, {e})  state value v_{k + 1} = {v:.1f}  "
              f"advantage r - v = {reward - v:+.2f}")
        print(f"  text:   {tokenizer.decode(sample.token_ids[s:e], skip_special_tokens=True)!r}")
        print(f"  critic: {answer[:300]!r}{'...' if len(answer) > 300 else ''}\n")
    critic.close(), engine.close()


if __name__ == "__main__":
    commands = {"sft": sft_main, "pretrain": pretrain_main, "explain": explain_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python genac_stages.py {{{','.join(commands)}}} ...   "
                 "(joint training: python train.py --algo genac)")
    commands[sys.argv[1]](sys.argv[2:])
