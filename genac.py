"""GenAC end to end (SPEC §4; paper: genac-generative-critics.txt §5 and Algorithm 1 in App. B).

The critic is a causal LM that *reads* a state — the problem and the actor's partial solution — and
reasons in text before stating an integer 0–10 (value = n / 10). Per iteration:

    1. the actor samples responses y; the verifier scores them (r ∈ {0, 1}); the ICC hint tau follows
       the actor's success rate:  tau <- c tau + (1 - c) r                                      (Alg. 1, l. 7)
    2. each response is cut into segments y_1 .. y_T (~ --segment-tokens each, token-exact);
       the critic states are s_k = x ∘ y_<k (s_1 = the bare prompt)                         (l. 12)
    3. ONE engine call: the critic answers the ICC prompt of every state -> v_k = n / 10
       (unparsable -> tau, counted)                                                         (l. 14-16)
    4. v_k on every token of segment k, token-level GAE (lambda = 1: A_t = r - v_k), whitened;
       the actor takes the shared PPO update                                                (l. 19-22)
    5. the critic is rewarded R_v = 1 - (r - v_k)^2 (0 when unparsable) and takes a REINFORCE step
       -(R_v - b) log pi_phi(z_t | s_k, z_<t) through the same update; its engine gets the new weights (l. 17, 23)

Training pipeline (each a command):
    python genac.py sft --teacher MODEL          # teacher answers ICC prompts -> JSONL -> SFT the critic
    python genac.py pretrain --critic DIR        # RL pretraining, actor frozen, stop when value MSE stops falling
    python train.py --algo genac --critic DIR    # joint training
    python genac.py explain --critic DIR         # one response's segments, values and advantages, printed
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from critic import GenerativeCritic, critic_reward

# ---------------------------------------------------------------------------------------------
# Segments and critic states


def token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    """The text of each token alone (only used to find delimiters; byte pieces may decode as '\ufffd')."""
    return [tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]


def _cut_level(texts: list[str], j: int) -> int:
    """How good a cut after token j is: 3 paragraph break, 2 line break, 1 sentence end, 0 none."""
    text = texts[j]
    if text.endswith("\n\n") or (text.endswith("\n") and j > 0 and texts[j - 1].endswith("\n")):
        return 3
    if text.endswith("\n"):
        return 2
    next_text = texts[j + 1] if j + 1 < len(texts) else " "
    if text.rstrip().endswith((".", "!", "?")) and next_text[:1].isspace():
        return 1
    return 0


def segment_boundaries(texts: list[str], segment_tokens: int = 32, max_segments: int = 8) -> list[int]:
    """Token-exact segmentation of one response -> the END index (exclusive) of each segment.

    texts: each token's text (`token_texts`). Returns strictly increasing ends, the last == len(texts);
    segment k is tokens [ends[k-1], ends[k]) with ends[-1] := 0 for k = 0; empty response -> [].
    Rule [SPEC §4, ours]: from a segment start s, if at most `segment_tokens` tokens remain they are the last
    segment; else among the cuts c in [s + L, s + 2L] (c tokens so far) take the best level present
    (paragraph > line > sentence end) and the earliest of that level; with no delimiter there, cut at s + L.
    More than `max_segments` segments: the tail is merged into the last allowed one.
    Example, L = 2: ["a", ".", " b", "\n", "c", "d"] -> [4, 6]: the cuts allowed first are after 2, 3 or 4 tokens;
    after 2 is a sentence end, after 4 a line break, which wins; the 2 tokens left are the last segment.
    """
    if segment_tokens < 1 or max_segments < 1:
        raise ValueError(f"--segment-tokens ({segment_tokens}) and --max-segments ({max_segments}) must be >= 1")
    n = len(texts)
    ends: list[int] = []
    start = 0
    while n - start > segment_tokens:
        window = range(start + segment_tokens, min(start + 2 * segment_tokens, n - 1) + 1)  # c = tokens before the cut
        levels = [(_cut_level(texts, c - 1), c) for c in window]
        best = max((level for level, _ in levels), default=0)
        cut = next(c for level, c in levels if level == best) if best > 0 else start + segment_tokens
        ends.append(cut)
        start = cut
    if n > start:
        ends.append(n)
    if len(ends) > max_segments:
        ends = ends[: max_segments - 1] + [n]
    return ends


def critic_state_prefixes(response_ids: list[int], ends: list[int]) -> list[list[int]]:
    """The response prefixes y_<k of the critic states s_k = x ∘ y_<k, one per segment (the first is empty)."""
    starts = [0] + ends[:-1]
    return [list(response_ids[:s]) for s in starts]


def segment_values_to_tokens(values: list[float], ends: list[int], length: int) -> torch.Tensor:
    """Broadcast segment values to tokens (Alg. 1 l. 19): v_k on every token of segment k. -> [length]."""
    out = torch.zeros(length)
    start = 0
    for v, end in zip(values, ends):
        out[start:end] = v
        start = end
    return out


# ---------------------------------------------------------------------------------------------
# One GenAC iteration's values: segments -> states -> ONE critic call -> token values (Alg. 1 l. 7-19)


def segment_values(critic, batch, problems, actor_tokenizer, seed: int) -> tuple[torch.Tensor, dict]:
    """Alg. 1 lines 12-19 for this rank's rollouts -> token values [N, R] (v_k on every token of segment k).

    Updates tau with the rollouts' rewards first (line 7), then judges every state s_k = x ∘ y_<k.
    """
    from actor import all_gather_objects, all_reduce
    args = critic.args
    rewards = batch.rewards.tolist()
    for rs in all_gather_objects(rewards):  # every rank's tau sees every rollout, in rank order
        critic.success_rate.update(rs)
    N, R = batch.response_mask.shape
    owners, state_problems, partials, all_ends = [], [], [], []
    for i in range(N):
        ids = batch.response_ids[i, : int(batch.response_lens[i])].tolist()
        ends = segment_boundaries(token_texts(actor_tokenizer, ids), args.segment_tokens, args.max_segments) or [0]
        all_ends.append(ends)
        for prefix in critic_state_prefixes(ids, ends):
            owners.append(i)
            state_problems.append(problems[int(batch.group_index[i])].problem)
            partials.append(actor_tokenizer.decode(prefix, skip_special_tokens=True))
    t = time.time()
    prompts, samples, parsed = critic.judge(state_problems, partials, seed)
    t_judge = time.time() - t
    values = [v if v is not None else critic.fallback_value() for v in parsed]
    critic_rewards = [critic_reward(rewards[i], v) for i, v in zip(owners, parsed)]
    critic.pending = {"prompts": prompts, "samples": samples, "critic_rewards": critic_rewards}
    token_values = torch.zeros(N, R)
    k = 0
    for i, ends in enumerate(all_ends):
        length = int(batch.response_lens[i])
        if length:
            token_values[i, :length] = segment_values_to_tokens(values[k:k + len(ends)], ends, length)
        k += len(ends)
    # metrics over all ranks (each rank judged its own rollouts' states)
    actor_tokens = float(batch.attention_mask.sum())
    totals = all_reduce(torch.tensor([len(parsed), sum(v is None for v in parsed), sum(critic_rewards), actor_tokens,
                                      sum(len(p) for p in prompts), sum(len(s.token_ids) for s in samples)], dtype=torch.float64))
    states, failures, reward_sum, actor_tokens, critic_prompt_tokens, critic_generated_tokens = totals.tolist()
    metrics = {"genac/states": int(states), "genac/parse_failures": int(failures),
               "genac/parse_rate": 1.0 - failures / max(states, 1),
               "genac/critic_reward": reward_sum / max(states, 1),
               "genac/icc_success_rate": critic.fallback_value(),
               "time/critic_generate": t_judge}
    # cost (paper App. C): PPO = 10 P T + 8 P T (critic forward + train on the actor's T tokens);
    # GenAC = 10 P T + 8 P T_c, T_c = the critic's prompt + generated tokens; same-size critic assumed
    metrics.update({"cost/actor_tokens": actor_tokens, "cost/critic_prompt_tokens": int(critic_prompt_tokens),
                    "cost/critic_generated_tokens": int(critic_generated_tokens),
                    "cost/flops_vs_ppo": (10 * actor_tokens + 8 * (critic_prompt_tokens + critic_generated_tokens))
                    / (18 * max(actor_tokens, 1.0))})
    return token_values, metrics


# ---------------------------------------------------------------------------------------------
# Flags shared by train.py --algo genac and the commands below


def add_critic_arguments(a) -> None:
    """`a` = parser.add_argument. The generative critic's flags (defaults: SPEC §4 / paper Table 5, CPU-sized)."""
    a("--critic-lr", type=float, default=None, help="default 5e-6 (PPO critic), 1e-6 (GenAC critic) [GenAC Table 5]")
    a("--segment-tokens", type=int, default=32, help="GenAC segment length L1 (paper: ~120 for 1-4k-token responses; "
      "the CPU default's responses are < 128 tokens)")
    a("--max-segments", type=int, default=8)
    a("--critic-max-new-tokens", type=int, default=128, help="critic reasoning budget (paper: 1024)")
    a("--critic-max-prompt-tokens", type=int, default=768)
    a("--critic-temperature", type=float, default=1.0)
    a("--icc-momentum", type=float, default=0.999, help="c in tau <- c tau + (1 - c) r, per sample")
    a("--no-icc", action="store_true", help="drop the ICC hints (actor size, success rate): the paper's ablation")
    a("--critic-baseline", default="mean", choices=("mean", "none"), help="REINFORCE baseline of the critic update")
    a("--critic-guided", action="store_true", help="constrain the critic's answers to '<reasoning> \\boxed{0..10}' with "
      "the engine's guided decoding (vLLM); the update still uses the model's unconstrained log-probs")


def _common_arguments(p: argparse.ArgumentParser, out_default: str) -> None:
    """What the stage commands need of train.py's flags (same names, same meaning)."""
    a = p.add_argument
    a("--actor", default=None, help="the actor (policy) whose values the critic learns (default: offline SmolLM2-135M)")
    a("--data", default="arithmetic", help="'arithmetic[:levels]' or a JSONL file")
    a("--problem-key", default="problem")
    a("--answer-key", default="answer")
    a("--out", default=out_default, help="where the critic folder and the stage's metrics go")
    a("--seed", type=int, default=0)
    a("--max-new-tokens", type=int, default=128, help="the actor's response budget")
    a("--engine", default="vllm", choices=("vllm", "hf"))
    a("--engine-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    a("--gpu-memory-utilization", type=float, default=0.2)
    a("--dtype", default="bf16", choices=("bf16", "fp32"))
    a("--micro-batch-size", type=int, default=8)
    a("--mini-batches", type=int, default=1)
    a("--loss-agg", default="token-mean")
    a("--clip-low", type=float, default=0.2)
    a("--clip-high", type=float, default=0.2)
    a("--grad-clip", type=float, default=1.0)
    a("--weight-decay", type=float, default=0.01)
    add_critic_arguments(a)


def _setup(args, critic_path: str):
    """-> (actor path, actor tokenizer, actor engine, critic, verifier). One process (a CPU or one GPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rollout import MathVerifier, make_engine, resolve_model_path
    actor_path = resolve_model_path(args.actor)
    tokenizer = AutoTokenizer.from_pretrained(actor_path)
    actor_engine = make_engine(args.engine, actor_path, dtype=args.engine_dtype, seed=args.seed, max_model_len=1024,
                               gpu_memory_utilization=args.gpu_memory_utilization)
    with torch.device("meta"):  # the actor's parameter count for the ICC hint, without loading its weights
        actor_parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(actor_path)).parameters())
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    critic = GenerativeCritic(critic_path, device, 1, args, actor_parameters)
    verifier = MathVerifier() if not args.data.startswith("arithmetic") else None
    return actor_path, tokenizer, actor_engine, critic, verifier


def _sample_states(actor_engine, tokenizer, problems, verifier, args, seed: int, samples_per_problem: int = 1):
    """The actor answers each problem; its responses are cut into states. -> (rollout rewards, states) with each
    state {"problem", "partial_response", "actor_reward"}."""
    from rollout import format_prompt, score_responses
    prompt_ids = [format_prompt(tokenizer, p) for p in problems]
    outs = actor_engine.generate(prompt_ids, samples_per_problem, args.max_new_tokens, 1.0, 1.0, seed)
    flat = [(p, s) for p, group in zip(problems, outs) for s in group]
    rewards, _ = score_responses([s.text for _, s in flat], [p for p, _ in flat], verifier, [s.finish_reason for _, s in flat])
    states = []
    for (p, s), r in zip(flat, rewards):
        ends = segment_boundaries(token_texts(tokenizer, s.token_ids), args.segment_tokens, args.max_segments) or [0]
        for prefix in critic_state_prefixes(s.token_ids, ends):
            states.append({"problem": p.problem, "partial_response": tokenizer.decode(prefix, skip_special_tokens=True),
                           "actor_reward": r})
    return rewards, states


def critic_quality(critic, states: list[dict], seed: int) -> dict:
    """Parse rate and mean critic reward R_v of the critic's sampled answers on `states` (one answer each), free
    and (when the engine can) with guided decoding — the latter scores the values whatever the format."""
    problems, partials = [s["problem"] for s in states], [s["partial_response"] for s in states]
    report = {"states": len(states)}
    for name, guided in (("", False), ("guided_", True)):
        if guided and not critic.engine.supports_regex:
            continue
        _, _, parsed = critic.judge(problems, partials, seed, guided=guided)
        rewards = [critic_reward(s["actor_reward"], v) for s, v in zip(states, parsed)]
        report[name + "parse_rate"] = sum(v is not None for v in parsed) / len(parsed)
        report[name + "critic_reward"] = sum(rewards) / len(rewards)
    return report


def sft_main(argv: list[str]) -> None:
    """Stage 1: a teacher answers the ICC prompt for states of held-out prompts; parseable answers -> JSONL -> SFT."""
    import json
    import random
    from pathlib import Path

    from actor import full_state_dict
    from rollout import DataError, load_problems, make_engine, resolve_model_path
    p = argparse.ArgumentParser(prog="genac.py sft", description=sft_main.__doc__)
    _common_arguments(p, "runs/genac-sft")
    p.add_argument("--teacher", default=None, help="any model the engine loads (default: the critic's base = the actor)")
    p.add_argument("--critic-base", default=None, help="model the critic starts from (default: the actor)")
    p.add_argument("-n", type=int, default=64, help="held-out prompts whose responses give the states")
    p.add_argument("--teacher-samples", type=int, default=4, help="teacher answers per state")
    p.add_argument("--sft-data", default=None, help="JSONL of teacher answers: reused if it exists (default: OUT/sft.jsonl)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--sft-lr", type=float, default=1e-5)
    p.add_argument("--val-frac", type=float, default=0.25, help="states held out to measure parse rate / critic reward")
    p.add_argument("--no-guided-teacher", action="store_true", help="let the teacher answer freely (default: its answers "
                   "are constrained to end in \\boxed{0..10}, since small teachers rarely follow the format)")
    args = p.parse_args(argv)
    try:
        problems = load_problems(args.data, "heldout", args.seed, args.problem_key, args.answer_key)[: args.n]
        critic_base = resolve_model_path(args.critic_base or args.actor)
        teacher_path = resolve_model_path(args.teacher or args.critic_base or args.actor)
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    args.critic_lr = args.sft_lr
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sft_path = Path(args.sft_data or out / "sft.jsonl")
    _, tokenizer, actor_engine, critic, verifier = _setup(args, critic_base)
    rewards, states = _sample_states(actor_engine, tokenizer, problems, verifier, args, args.seed)
    critic.success_rate.update(rewards)  # tau: the actor's success rate on these prompts
    random.Random(args.seed).shuffle(states)
    n_val = max(1, int(len(states) * args.val_frac))
    val_states, train_states = states[:n_val], states[n_val:]
    print(f"[sft] {len(states)} states from {len(problems)} prompts (actor success rate {critic.fallback_value():.2f}); "
          f"{len(val_states)} held out", file=sys.stderr)
    if sft_path.is_file():
        rows = [json.loads(line) for line in sft_path.read_text().splitlines() if line.strip()]
        print(f"[sft] reusing {len(rows)} teacher answers from {sft_path}", file=sys.stderr)
    else:
        separate_teacher = teacher_path != critic_base
        if separate_teacher:  # the teacher answers the critic's prompts through an engine of its own
            own_engine, critic.engine = critic.engine, make_engine(
                args.engine, teacher_path, dtype=args.engine_dtype, seed=args.seed + 3,
                max_model_len=args.critic_max_prompt_tokens + args.critic_max_new_tokens)
        rows, asked = [], 0
        for j in range(args.teacher_samples):
            prompts, samples, parsed = critic.judge([s["problem"] for s in train_states],
                                                    [s["partial_response"] for s in train_states], args.seed + 100 + j,
                                                    guided=not args.no_guided_teacher)
            asked += len(samples)
            for s, prompt, sample, v in zip(train_states, prompts, samples, parsed):
                if v is not None:
                    rows.append({"prompt_ids": prompt, "response": sample.text, "response_ids": sample.token_ids, "value": v,
                                 "actor_reward": s["actor_reward"], "problem": s["problem"], "partial_response": s["partial_response"]})
        if separate_teacher:
            critic.engine.close()
            critic.engine = own_engine
        tmp = sft_path.with_name(sft_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, sft_path)
        print(f"[sft] teacher {teacher_path}: {len(rows)}/{asked} answers parse ({len(rows) / max(asked, 1):.1%}) -> {sft_path}",
              file=sys.stderr)
    if not rows:
        sys.exit("error: no teacher answer parsed; try another --teacher or more --teacher-samples")
    before = critic_quality(critic, val_states, args.seed + 7)
    metrics = supervised_finetune(critic, rows, args)
    critic.engine.load_weights(full_state_dict(critic.model).items())
    after = critic_quality(critic, val_states, args.seed + 7)
    critic.save(out / "critic", rank=0)
    report = {"stage": "sft", "teacher": teacher_path, "teacher_guided": not args.no_guided_teacher, "sft_rows": len(rows), "before": before, "after": after, **metrics}
    (out / "sft_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"[sft] critic -> {out / 'critic'}; next: python genac.py pretrain --critic {out / 'critic'} --out ...", file=sys.stderr)
    critic.close()
    actor_engine.close()
    if verifier is not None:
        verifier.close()


def supervised_finetune(critic, rows: list[dict], args) -> dict:
    """Cross-entropy on the teacher's answer tokens given the ICC prompt, token-mean per optimizer step."""
    import random

    from tqdm import tqdm

    from actor import autocast_context, micro_batches, policy_forward, to_device
    from rollout import Sample, build_rollout_batch
    device = critic.device
    batch = build_rollout_batch([r["prompt_ids"] for r in rows], [[Sample(r["response_ids"], [0.0] * len(r["response_ids"]),
                                                                            r["response"], "stop")] for r in rows],
                                [0.0] * len(rows), critic.pad_id)
    order = list(range(len(rows)))
    losses = []
    critic.model.train()
    steps_per_epoch = max(1, len(rows) // (args.micro_batch_size * 2))
    for epoch in range(args.epochs):
        random.Random(args.seed + epoch).shuffle(order)
        chunks = [order[i::steps_per_epoch] for i in range(steps_per_epoch)]
        for chunk in tqdm(chunks, desc=f"sft epoch {epoch + 1}"):
            mini = batch.select(torch.tensor(chunk))
            tokens = float(mini.response_mask.sum())
            critic.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for idx in micro_batches(mini.prompt_lens + mini.response_lens, args.micro_batch_size):
                mb = to_device(mini.select(idx), device)
                with autocast_context(args, device):
                    logp, _, _ = policy_forward(critic.model, mb)
                loss = -(logp * mb.response_mask).sum() / tokens
                loss.backward()
                total += float(loss)
            torch.nn.utils.clip_grad_norm_(critic.model.parameters(), args.grad_clip)
            critic.optimizer.step()
            losses.append(total)
    return {"sft_loss_first": losses[0], "sft_loss_last": losses[-1], "sft_steps": len(losses)}


def pretrain_main(argv: list[str]) -> None:
    """Stage 2: RL pretraining with the actor frozen; stops when the value-benchmark MSE stops falling."""
    import json
    import time
    from pathlib import Path

    from tqdm import tqdm

    from eval import build_value_states, load_or_build_states, value_quality
    from rollout import DataError, build_rollout_batch, format_prompt, load_problems, resolve_model_path, score_responses
    p = argparse.ArgumentParser(prog="genac.py pretrain", description=pretrain_main.__doc__)
    _common_arguments(p, "runs/genac-pretrain")
    p.add_argument("--critic", default=None, help="critic to start from (a `genac.py sft` folder; default: the actor's base)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--rollouts-per-prompt", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=2, help="value-benchmark MSE every N steps")
    p.add_argument("--patience", type=int, default=2, help="stop after this many evaluations without a lower MSE")
    p.add_argument("--val-n", type=int, default=32, help="held-out prompts of the benchmark's state set")
    p.add_argument("--val-m", type=int, default=16, help="Monte-Carlo continuations per benchmark state")
    args = p.parse_args(argv)
    try:
        train_problems = load_problems(args.data, "train", args.seed, args.problem_key, args.answer_key)
        val_problems = load_problems(args.data, "heldout", args.seed, args.problem_key, args.answer_key)[: args.val_n]
        critic_path = resolve_model_path(args.critic or args.actor)
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.critic_lr is None:
        args.critic_lr = 1e-6
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    actor_path, tokenizer, actor_engine, critic, verifier = _setup(args, critic_path)
    meta = {"policy": actor_path, "data": args.data, "n": len(val_problems), "m": args.val_m, "candidates": 0,
            "rank_prompts": 0, "segment_tokens": args.segment_tokens, "max_segments": args.max_segments,
            "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    states = load_or_build_states(out / "value_states.json", meta, lambda: build_value_states(
        actor_engine, tokenizer, val_problems, verifier, args.val_m, 0, 0, args.segment_tokens, args.max_segments,
        args.max_new_tokens, args.seed))
    value_fn = critic.value_fn(seed=args.seed + 11)

    def benchmark_mse() -> dict:
        q = value_quality(states, value_fn([s["problem"] for s in states], [s["partial_response"] for s in states]))
        pearson = q["pearson"] if q["pearson"] == q["pearson"] else None  # nan (constant predictions) -> null
        return {"val/mse": q["mse"], "val/pearson": pearson, "val/parse_failures": critic.last_parse_failures}

    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    log = lambda row: metrics_path.open("a").write(json.dumps(row) + "\n")  # noqa: E731
    first = benchmark_mse()
    log({"step": 0, **first})
    print(f"[pretrain] step 0: value MSE {first['val/mse']:.4f}", file=sys.stderr)
    best, waited = first["val/mse"], 0
    critic.save(out / "critic", rank=0)
    rng = torch.Generator().manual_seed(args.seed)
    for step in tqdm(range(args.steps), desc="genac pretrain"):
        t0 = time.time()
        idx = torch.randint(len(train_problems), (args.prompts_per_step,), generator=rng).tolist()
        problems = [train_problems[i] for i in idx]
        prompt_ids = [format_prompt(tokenizer, q) for q in problems]
        samples = actor_engine.generate(prompt_ids, args.rollouts_per_prompt, args.max_new_tokens, 1.0, 1.0, args.seed + 1000 + step)
        flat = [(q, s) for q, group in zip(problems, samples) for s in group]
        rewards, _ = score_responses([s.text for _, s in flat], [q for q, _ in flat], verifier, [s.finish_reason for _, s in flat])
        batch = build_rollout_batch(prompt_ids, samples, rewards, critic.pad_id)
        batch.extras["step"] = step
        _, m = segment_values(critic, batch, problems, tokenizer, seed=args.seed + 2000 + step)
        m.update(critic.update(batch, args, critic.device, 1))
        row = {"step": step + 1, "reward": sum(rewards) / len(rewards), **m, "time/step": time.time() - t0}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row.update(benchmark_mse())
            if row["val/mse"] < best:
                best, waited = row["val/mse"], 0
                critic.save(out / "critic", rank=0)  # keep the best critic
            else:
                waited += 1
        log(row)
        print(f"[pretrain] step {step + 1}: parse rate {m['genac/parse_rate']:.2f} critic reward {m['genac/critic_reward']:.3f}"
              + (f" value MSE {row['val/mse']:.4f}" if "val/mse" in row else ""), file=sys.stderr)
        if waited >= args.patience:
            print(f"[pretrain] value MSE has not fallen for {waited} evaluations: stopping", file=sys.stderr)
            break
    print(json.dumps({"stage": "pretrain", "value_mse_before": first["val/mse"], "value_mse_best": best,
                      "critic": str(out / "critic")}, indent=2))
    critic.close()
    actor_engine.close()
    if verifier is not None:
        verifier.close()


def explain_main(argv: list[str]) -> None:
    """A worked example: one response's segments, the critic's value of each state, and the advantages."""
    from rollout import DataError, build_rollout_batch, format_prompt, load_problems, resolve_model_path, score_responses
    p = argparse.ArgumentParser(prog="genac.py explain", description=explain_main.__doc__)
    _common_arguments(p, "")
    p.add_argument("--critic", default=None, help="critic folder (default: the actor's base)")
    p.add_argument("--problem-index", type=int, default=0, help="which held-out problem")
    args = p.parse_args(argv)
    try:
        problem = load_problems(args.data, "heldout", args.seed, args.problem_key, args.answer_key)[args.problem_index]
        critic_path = resolve_model_path(args.critic or args.actor)
    except (DataError, FileNotFoundError, IndexError) as e:
        sys.exit(f"error: {e}")
    if args.critic_lr is None:
        args.critic_lr = 1e-6
    _, tokenizer, actor_engine, critic, verifier = _setup(args, critic_path)
    prompt_ids = [format_prompt(tokenizer, problem)]
    samples = actor_engine.generate(prompt_ids, 4, args.max_new_tokens, 1.0, 1.0, args.seed)
    sample = max(samples[0], key=lambda s: len(s.token_ids))  # the longest of 4: most segments
    reward = score_responses([sample.text], [problem], verifier)[0][0]
    batch = build_rollout_batch(prompt_ids, [[sample]], [reward], critic.pad_id)
    values, m = segment_values(critic, batch, [problem], tokenizer, seed=args.seed + 1)
    ends = segment_boundaries(token_texts(tokenizer, sample.token_ids), args.segment_tokens, args.max_segments)
    print(f"problem: {problem.problem}   (answer {problem.answer})\nreward r = {reward:.0f}    ICC success rate "
          f"tau = {critic.fallback_value():.2f}    parse failures {m['genac/parse_failures']}/{m['genac/states']}\n")
    starts = [0] + ends[:-1]
    for k, (s, e) in enumerate(zip(starts, ends)):
        v = float(values[0, s])
        answer = critic.pending["samples"][k].text.strip().replace("\n", " ")
        print(f"segment {k + 1}: tokens [{s}, {e})  state value v_{k + 1} = {v:.1f}  advantage r - v = {reward - v:+.2f}")
        print(f"  text:   {tokenizer.decode(sample.token_ids[s:e], skip_special_tokens=True)!r}")
        print(f"  critic: {answer[:300]!r}{'...' if len(answer) > 300 else ''}\n")
    critic.close()
    actor_engine.close()


if __name__ == "__main__":
    commands = {"sft": sft_main, "pretrain": pretrain_main, "explain": explain_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python genac.py {{{','.join(commands)}}} ...   (joint training: python train.py --algo genac)")
    commands[sys.argv[1]](sys.argv[2:])
