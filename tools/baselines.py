"""Which value estimate is best per generated token: every algorithm's baseline for the same prompts, scored against
Monte-Carlo truth with bootstrap intervals.

    python eval.py baselines                                      # base policy, 200 held-out arithmetic prompts, M = 32
    python eval.py baselines --policy runs/default/checkpoint-000030 --prompts 100
    python eval.py baselines --data ../shared/data/gsm8k_train.jsonl --critic runs/vcppo/critic-pretrained

For a fixed policy and N held-out prompts x:
    truth      V(x) = mean reward of M samples from ONE engine call; its sampling variance se²(x) = s²(x)/M, s² the
               unbiased sample variance of those M rewards                                          `truth_from_rewards`
    estimates  every method's baseline b(x) from FRESH samples (a pool of K_max = 16 per prompt, drawn after the truth):
               GRPO group mean and RLOO leave-one-out mean over the first G of the pool, G in {2, 4, 8, 16}
               (advantage.py)                                                                   `group_mean_methods`
               V0.5 prior alone, prior + shrinkage fusion at 4, prior + fusion + OSLA at its default budget, rollouts
               served from the same pool in order (prior.py, arXiv V0.5 §3-4)                       `v05_methods`
               POISE: b_i = mean_{j≠i} g(z_j) over the pool's first 2 rollouts, the probe g fitted on features of a
               disjoint prompt set the way training fits it (probe.py)                              `poise_method`
               PPO: the critic's value head at the prompt state, fresh (PPO's start); VC-PPO: the same head after
               VC-PPO's value pretraining on the frozen policy, disjoint prompts (critic.py)       `train_value_critic`
               GenAC: the generative critic's value at the prompt state, one answer, guided decoding (genac.py)
    costs      per prompt: policy tokens generated for the estimate, and critic/prior tokens (tokens a critic or the
               prior's embedder reads, plus tokens a generative critic writes)
    statistics per method, each with a 95% percentile bootstrap interval over prompts (the same resamples for every
               method, so paired differences to GRPO G = 8 are exact pairs)                      `bootstrap_summary`
               MSE      mean_x mean_i (b_i(x) − V(x))² − se²(x): every estimate is independent of the truth's
                        samples (fresh samples, disjoint fitting prompts), so E(b − V̂)² = E(b − V)² + se²
                        and the subtraction leaves an unbiased estimate of the MSE to the true value (it can come out
                        below 0)
               bias     mean_x (mean_i b_i(x) − V(x))   (the truth's noise has mean 0: no correction needed)
               Spearman rank correlation of mean_i b_i(x) with V(x) over prompts (attenuated by the truth's noise;
                        not corrected)
               A²       mean_x mean_i (r_i − b_i)² on the [0, 1] reward scale, over the rollouts its update
                        uses (its own; the first 8 of the pool for a critic or the prior alone): for a baseline
                        independent of r_i it is Var(r) + MSE; a baseline that includes r_i (GRPO's mean, V0.5's
                        fusion) is pulled toward r_i and scores lower, which says nothing about the bias that brings
                        to the gradient
    path states  the critics also on the path states of `eval.py values` (tools/values.py), the same table as there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from flags import OneLineParser, model_error
from prior import effective_k_max
from probe import cross_rollout_targets
from tools.baseline_stats import (GROUP_SIZES, REFERENCE, bootstrap_summary, critic_method,
                                  group_mean_methods, markdown_table, per_prompt_terms, plot_mse_vs_tokens,
                                  poise_method, truth_from_rewards, v05_methods)

# ---------------------------------------------------------------------------------------------
# 4. The run: one policy engine (truth, pool, fitting rollouts, path states), then the probe, the critics, GenAC


def split_prompts(data: str, num_prompts: int, num_fit: int, seed: int, problem_key: str, answer_key: str):
    """-> (benchmark problems, fitting problems), disjoint: arithmetic's held-out and train splits, or a JSONL's first
    num_prompts rows and the num_fit rows after them."""
    from data import load_problems
    if data == "arithmetic" or data.startswith("arithmetic:"):
        bench, fit = load_problems(data, "benchmark", seed)[:num_prompts], load_problems(data, "train", seed)[:num_fit]
    else:
        rows = load_problems(data, "benchmark", seed, problem_key, answer_key)
        bench, fit = rows[:num_prompts], rows[num_prompts:num_prompts + num_fit]
    if len(bench) < num_prompts or len(fit) < num_fit:
        raise ValueError(f"--data {data} has {len(bench)} benchmark and {len(fit)} fitting prompts; "
                         f"asked for {num_prompts} and {num_fit} (--prompts, --fit-prompts)")
    return bench, fit


def sample_and_score(engine, tokenizer, problems, n, max_new_tokens: int, verifier, seed: int):
    """n samples per prompt (int or per-prompt list), one engine call -> (prompt ids, samples[x][i], rewards[x][i])."""
    from data import format_prompt
    from verifier import score_responses
    prompt_ids = [format_prompt(tokenizer, p) for p in problems]
    samples = engine.generate(prompt_ids, n, max_new_tokens, 1.0, 1.0, seed)
    flat, _ = score_responses([s.text for g in samples for s in g], [p for p, g in zip(problems, samples) for _ in g],
                              verifier, [s.finish_reason for g in samples for s in g])
    it = iter(flat)
    return prompt_ids, samples, [[next(it) for _ in g] for g in samples]


def probe_features(model, tokenizer, prompt_ids, samples, rewards):
    """POISE's features of the rollouts samples[x][i] from the trainer's no-grad pass (probe.POISE.features), POISE
    as train.py builds it -> (features z [N, 2H + 3], group index [N], the POISE whose probe is fitted on them)."""
    import actor
    from flags import parse_train_args
    from probe import POISE
    from rollout import build_rollout_batch
    poise = POISE(parse_train_args(["--algo", "poise", "--probe-bootstrap-steps", "0"]), model, tokenizer, None, 1)
    batch = build_rollout_batch(prompt_ids, samples, [r for rs in rewards for r in rs], tokenizer.pad_token_id)
    passes = SimpleNamespace(micro_batch_size=16, dtype="bf16", share_prompts=False, temperature=1.0)
    features = poise.features(batch, actor.old_logprob_passes(model, batch, passes, torch.device("cpu"),
                                                              hidden_layer=poise.layer))
    return features, batch.group_index, poise


def value_critic(policy: str, tokenizer, seed: int):
    """VC-PPO's critic (critic.VCPPO with train.py's defaults: Monte-Carlo targets, clipped value loss 0.5, AdamW at
    lr 5e-6, 2 mini-batches), a fresh scalar head on the policy's body: before pretraining, PPO's starting critic."""
    from critic import VCPPO
    from flags import add_update_arguments
    parser = argparse.ArgumentParser()
    add_update_arguments(parser)
    VCPPO.add_arguments(parser)
    # no warm-up: after_update writes no critic-pretrained/ folder (it saves at the last warm-up step)
    parser.set_defaults(model=policy, critic_model=policy, seed=seed, out=None, critic_warmup_steps=0)
    return VCPPO(parser.parse_args([]), None, tokenizer, torch.device("cpu"), 1)


def pretrain_value_critic(algo, tokenizer, prompt_ids, samples, rewards, iterations: int, prompts_per_iteration: int,
                          progress) -> list[float]:
    """VC-PPO's value pretraining (arXiv:2503.01491 §4) on the frozen policy's rollouts: `iterations` batches of
    `prompts_per_iteration` prompts (train.py: 4 x 8 rollouts), each through VCPPO.advantages (the returns) and
    VCPPO.after_update (the critic's step). -> the critic's squared error to the returns of each iteration."""
    from rollout import Step, build_rollout_batch
    errors = []
    for it in progress(range(iterations), desc="VC-PPO value pretraining"):
        part = range(it * prompts_per_iteration, (it + 1) * prompts_per_iteration)
        batch = build_rollout_batch([prompt_ids[i] for i in part], [samples[i] for i in part],
                                    [r for i in part for r in rewards[i]], tokenizer.pad_token_id)
        step = Step(index=it, seed=it, generate=None, actor_passes=None, engine=None)
        algo.advantages(batch, None, step)
        errors.append(algo.after_update(batch, step)["critic/mse_to_returns"])
    return errors


def critic_values(model, tokenizer, problems: list[str], partials: list[str]) -> list[float]:
    """A discriminative critic's value of states (problem, partial response; "" = the prompt state), through
    critic.discriminative_value_fn."""
    from critic import discriminative_value_fn
    return discriminative_value_fn(model, tokenizer, torch.device("cpu"))(problems, partials)


def judged_values(genac, problems: list[str], partials: list[str], seed: int):
    """GenAC's critic on states (problem, partial response), ONE engine call (genac.GenAC.judge), an unparsable answer
    valued at tau (GenAC.fallback_value) -> (values [S], critic prompt tokens [S], critic generated tokens [S],
    number unparsable)."""
    prompts, samples, parsed = genac.judge(problems, partials, seed)
    values = [v if v is not None else genac.fallback_value() for v in parsed]
    return values, [len(p) for p in prompts], [len(s.token_ids) for s in samples], sum(v is None for v in parsed)


def run_benchmark(args, paths: dict) -> dict:
    """Everything above, in order -> the JSON document (`write_report` writes it). paths: the model folders of
    --policy, --critic and --genac (None when not given)."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine import make_engine
    from prior import ValuePrior
    from verifier import MathVerifier
    from tools.values import build_value_states, constant_baselines, load_generative_critic, value_quality
    started, seconds = time.time(), {}
    bench, fit = split_prompts(args.data, args.prompts, args.fit_prompts, args.seed, args.problem_key, args.answer_key)
    tokenizer = AutoTokenizer.from_pretrained(paths["policy"])
    verifier = MathVerifier() if any(p.kind == "math" for p in bench + fit) else None
    phases = tqdm(total=7, desc="baselines", file=sys.stderr)
    pool_size = max(max(GROUP_SIZES), effective_k_max(0.0039))  # V0.5's default c = 0.0039 -> K_max = 16
    critic_prompts = args.critic_iterations * 4

    def phase(name):
        seconds[name] = time.time() - phase.t
        phase.t = time.time()
        phases.update(1)
        phases.set_postfix_str(name)
    phase.t = time.time()

    engine = make_engine("vllm", paths["policy"], dtype=args.engine_dtype, seed=args.seed, max_model_len=2048)
    try:
        bench_ids, _, truth_rewards = sample_and_score(engine, tokenizer, bench, args.truth_samples,
                                                       args.max_new_tokens, verifier, args.seed)
        phase("truth")
        _, pool, pool_rewards = sample_and_score(engine, tokenizer, bench, pool_size, args.max_new_tokens, verifier,
                                                 args.seed + 1)
        fit_counts = [8 if i < critic_prompts else 4 for i in range(len(fit))]
        fit_ids, fit_samples, fit_rewards = sample_and_score(engine, tokenizer, fit, fit_counts, args.max_new_tokens,
                                                             verifier, args.seed + 2)
        phase("fresh and fitting rollouts")
        path_problems = bench[: args.path_prompts]
        states = []
        if path_problems:  # no ranking groups: candidates=1
            states = build_value_states(engine, tokenizer, path_problems, verifier, args.path_samples, candidates=1,
                                        rank_prompts=0, max_new_tokens=args.max_new_tokens, seed=args.seed + 1000)
        phase("path states")
    finally:
        engine.close()
    truth, truth_se2 = truth_from_rewards(truth_rewards)
    pool_tokens = [[len(s.token_ids) for s in g] for g in pool]
    fit_rates = [sum(r[:4]) / 4 for r in fit_rewards]

    # V0.5: the prior's context is the fitting prompts' success rates (4 rollouts each, V0.5's first round)
    prior = ValuePrior(seed=args.seed)
    prior.update([p.problem for p in fit], fit_rates)
    prior_values = prior.predict([p.problem for p in bench]).tolist()
    embed_len = lambda texts: [len(ids) for ids in  # noqa: E731
                               prior.tokenizer(texts, truncation=True, max_length=prior.max_length)["input_ids"]]
    context_tokens = sum(embed_len([p.problem for p in fit][: prior.context_size]))
    prior_tokens = [t + context_tokens / len(bench) for t in embed_len([p.problem for p in bench])]
    methods = group_mean_methods(pool_rewards, pool_tokens)
    methods += v05_methods(prior_values, prior_tokens, pool_rewards, pool_tokens)

    # POISE: the probe fitted on the fitting prompts' first 2 rollouts (targets: the sibling's reward), then g(z) of
    # the benchmark's first 2 pool rollouts
    model = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=torch.float32).eval()
    fit_features, fit_groups, poise = probe_features(model, tokenizer, fit_ids, [g[:2] for g in fit_samples],
                                                     [r[:2] for r in fit_rewards])
    targets = cross_rollout_targets(torch.tensor([r for rs in fit_rewards for r in rs[:2]]), fit_groups)
    poise.baseline.probe.fit(fit_features, targets)
    bench_features, _, _ = probe_features(model, tokenizer, bench_ids, [g[:2] for g in pool],
                                          [r[:2] for r in pool_rewards])
    probe_values = poise.baseline.predict_values(bench_features).view(len(bench), 2).tolist()
    methods.append(poise_method(probe_values, pool_rewards, pool_tokens))
    del model
    phase("prior and probe")

    # PPO (the fresh head) and VC-PPO (after value pretraining), or a loaded critic
    prompt_lens = [len(ids) for ids in bench_ids]
    texts, blank = [p.problem for p in bench], [""] * len(bench)
    path_texts = [s["problem"] for s in states], [s["partial_response"] for s in states]
    path_models: dict[str, list[float]] = dict(constant_baselines(states)) if states else {}
    critic = value_critic(paths["policy"], tokenizer, args.seed)
    methods.append(critic_method("PPO critic, fresh head", "ppo", critic_values(critic.model, tokenizer, texts, blank),
                                 prompt_lens, [0] * len(bench), pool_rewards, "the value head PPO starts from"))
    if states:
        path_models["PPO critic, fresh head"] = critic_values(critic.model, tokenizer, *path_texts)
    critic_errors = pretrain_value_critic(critic, tokenizer, fit_ids, [g[:8] for g in fit_samples],
                                          [r[:8] for r in fit_rewards], args.critic_iterations, 4,
                                          lambda it, desc: tqdm(it, desc=desc, file=sys.stderr))
    name = f"VC-PPO critic, {args.critic_iterations} pretraining iterations"
    methods.append(critic_method(name, "vcppo", critic_values(critic.model, tokenizer, texts, blank), prompt_lens,
                                 [0] * len(bench), pool_rewards, "trained in this run on disjoint prompts"))
    if states:
        path_models[name] = critic_values(critic.model, tokenizer, *path_texts)
    del critic
    if paths["critic"]:
        from critic import load_value_model
        loaded = load_value_model(paths["critic"], torch.device("cpu"), 1, seed=args.seed)
        methods.append(critic_method(f"critic {paths['critic']}", "vcppo",
                                     critic_values(loaded, tokenizer, texts, blank), prompt_lens,
                                     [0] * len(bench), pool_rewards, "loaded"))
        if states:
            path_models[f"critic {paths['critic']}"] = critic_values(loaded, tokenizer, *path_texts)
        del loaded
    phase("value critics")

    # GenAC: the generative critic at the prompt state (and the path states), one guided answer each
    genac_path = paths["genac"] or paths["policy"]
    genac = load_generative_critic(genac_path, args, paths["policy"], not args.genac_unguided,
                                   args.genac_max_new_tokens)
    if genac.success_rate.value is None:  # the ICC hint: the policy's success rate on the fitting prompts
        genac.success_rate.update([sum(fit_rates) / len(fit_rates)])
    try:
        values, read, generated, failures = judged_values(genac, texts + path_texts[0], blank + path_texts[1],
                                                          args.seed + 7)
        guided = "unguided" if args.genac_unguided else "guided"
        gname = f"GenAC critic ({'base model' if not paths['genac'] else paths['genac']}, {guided})"
        methods.append(critic_method(gname, "genac", values[: len(bench)], read[: len(bench)], generated[: len(bench)],
                                     pool_rewards, f"{failures} of {len(values)} answers unparsable (valued at tau)"))
        if states:
            path_models[gname] = values[len(bench):]
    finally:
        genac.close()
    if verifier is not None:
        verifier.close()
    phase("GenAC critic")

    terms = {m.name: per_prompt_terms(m, truth, truth_se2) for m in methods}
    summary = bootstrap_summary(terms, truth, REFERENCE, args.bootstrap, args.seed,
                                lambda it: tqdm(it, desc="bootstrap", file=sys.stderr))
    path_table = {name: value_quality(states, preds, sizes=()) for name, preds in path_models.items()} if states else {}
    phase("statistics")
    phases.close()
    return {"meta": {"policy": paths["policy"], "data": args.data, "prompts": len(bench),
                     "truth_samples": args.truth_samples,
                     "fit_prompts": len(fit), "pool_size": pool_size, "critic_iterations": args.critic_iterations,
                     "critic_mse_to_returns_per_iteration": critic_errors, "path_prompts": len(path_problems),
                     "path_samples": args.path_samples, "bootstrap": args.bootstrap, "seed": args.seed,
                     "reference": REFERENCE,
                     "max_new_tokens": args.max_new_tokens, "seconds": seconds, "total_seconds": time.time() - started},
            "truth": {"mean_value": float(truth.mean()), "mean_se": float(np.sqrt(truth_se2).mean()),
                      "mean_se2": float(truth_se2.mean()), "fit_success_rate": sum(fit_rates) / len(fit_rates),
                      "values": truth.tolist(), "se2": truth_se2.tolist()},
            "methods": {m.name: {"algorithm": m.algorithm, "note": m.note, **summary[m.name],
                                 "generated_per_prompt": float(np.mean(m.policy_tokens) + np.mean(m.critic_generated)),
                                 "estimates": terms[m.name]["estimate"].tolist()} for m in methods},
            "path_states": {"states": sum(s["kind"] == "path" for s in states), "results": path_table}}


def write_report(doc: dict, out: Path) -> str:
    """baselines.json (atomically), baselines.md (the tables), baselines_mse_vs_tokens.png in `out` -> the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    meta, truth = doc["meta"], doc["truth"]
    header = (f"{meta['prompts']} prompts of {meta['data']}, policy {meta['policy']}; truth V(x) = mean of "
              f"{meta['truth_samples']} samples (mean V {truth['mean_value']:.3f}, mean standard error "
              f"{truth['mean_se']:.3f}, mean se² {truth['mean_se2']:.4f} subtracted from every MSE); 95% bootstrap "
              f"intervals over prompts ({meta['bootstrap']} resamples), "
              f"Δ = method − {meta['reference']} on the same "
              f"resamples; {meta['total_seconds'] / 60:.1f} min.")
    lines = [header, "", markdown_table(doc["methods"], meta["reference"])]
    if doc["path_states"]["results"]:
        path_header = (f"Path states of `eval.py values` ({doc['path_states']['states']} states of "
                       f"{meta['path_prompts']} prompts, truth = mean of {meta['path_samples']} continuations):")
        lines += ["", path_header, "", "| value model | MSE | MAE | Pearson r |\n|---|---|---|---|"]
        lines += [f"| {n} | {q['mse']:.4f} | {q['mae']:.4f} | {q['pearson']:.3f} |"
                  for n, q in doc["path_states"]["results"].items()]
    text = "\n".join(lines) + "\n"
    tmp = out / "baselines.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out / "baselines.json")
    (out / "baselines.md").write_text(text)
    plot_mse_vs_tokens(doc["methods"], out / "baselines_mse_vs_tokens.png",
                       f"{Path(meta['policy']).name}: {meta['prompts']} prompts, M = {meta['truth_samples']}")
    return text


def baselines_main(argv: list[str]) -> None:
    """`python eval.py baselines`: see the module docstring."""
    ap = OneLineParser(prog="eval.py baselines", description="Every algorithm's baseline vs Monte-Carlo V(x) "
                       "with cost in generated tokens and bootstrap intervals (tools/baselines.py).")
    ap.add_argument("--policy", default=None, help="policy folder (default: the offline SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default="arithmetic", help="'arithmetic[:levels]' (held-out split) or a JSONL file")
    ap.add_argument("--prompts", type=int, default=200, help="benchmark prompts N")
    ap.add_argument("--truth-samples", type=int, default=32, help="samples per prompt for the truth V(x), M >= 2")
    ap.add_argument("--fit-prompts", type=int, default=256,
                    help="disjoint prompts: probe fit, prior context, critic training")
    ap.add_argument("--critic-iterations", type=int, default=6,
                    help="VC-PPO value-pretraining iterations (its default: 6)")
    ap.add_argument("--critic", default=None,
                    help="also score this critic folder (e.g. OUT/critic-pretrained of a vcppo run)")
    ap.add_argument("--genac", default=None,
                    help="generative critic folder (default: the policy's base model, untrained)")
    ap.add_argument("--genac-unguided", action="store_true", help="no guided decoding of the critic's answers")
    ap.add_argument("--genac-max-new-tokens", type=int, default=128,
                    help="the generative critic's reasoning budget (GenAC's CPU profile: 128; the paper's: 1024)")
    ap.add_argument("--path-prompts", type=int, default=48,
                    help="prompts whose path states the critics are also scored on")
    ap.add_argument("--path-samples", type=int, default=16, help="Monte-Carlo continuations per path state")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--engine-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--problem-key", default="problem")
    ap.add_argument("--answer-key", default="answer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default: runs/baselines/<policy>-<data>-n<N>-m<M>)")
    args = ap.parse_args(argv)
    for flag, value, low in (("--prompts", args.prompts, 2), ("--truth-samples", args.truth_samples, 2),
                             ("--fit-prompts", args.fit_prompts, 2), ("--critic-iterations", args.critic_iterations, 0),
                             ("--path-prompts", args.path_prompts, 0), ("--path-samples", args.path_samples, 1),
                             ("--bootstrap", args.bootstrap, 10)):
        if value < low:
            ap.error(f"{flag} must be >= {low}, got {value}")
    if args.fit_prompts < 4 * args.critic_iterations:
        ap.error(f"--fit-prompts ({args.fit_prompts}) must cover --critic-iterations x 4 = "
                 f"{4 * args.critic_iterations} prompts")
    if args.path_prompts > args.prompts:
        ap.error(f"--path-prompts ({args.path_prompts}) must be <= --prompts ({args.prompts})")
    for flag, value in (("--policy", args.policy), ("--critic", args.critic), ("--genac", args.genac)):
        if message := model_error(flag, value):  # named by its own flag (resolve_model_path says --model)
            sys.exit(f"eval.py baselines: error: {message}")
    from data import DataError
    from rollout import resolve_model_path
    try:
        paths = {flag: resolve_model_path(getattr(args, flag)) if getattr(args, flag) or flag == "policy" else None
                 for flag in ("policy", "critic", "genac")}
        slug = lambda s: Path(str(s).rstrip("/")).name.replace(":", "_").replace(",", "_")  # noqa: E731
        name = f"{slug(paths['policy'])}-{slug(args.data)}-n{args.prompts}-m{args.truth_samples}"
        out = Path(args.out or f"runs/baselines/{name}")
        doc = run_benchmark(args, paths)
    except (DataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(write_report(doc, out), end="")
    print(f"-> {out}/baselines.json, baselines.md, baselines_mse_vs_tokens.png", file=sys.stderr)
