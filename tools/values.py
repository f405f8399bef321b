"""Value-model quality: how well a critic, a generative critic or POISE's probe predicts the policy's success.

    python eval.py values --critic init --critic runs/vcppo/critic-pretrained   # Monte-Carlo benchmark (GenAC §4)
    python eval.py values --genac runs/genac-pretrain/critic --genac base
    python eval.py probe runs/poise                   # POISE's probe value vs held-out avg@8; --cost: its overhead

The commands run through eval.py; this module holds the benchmark (states, Monte-Carlo ground truth, MSE,
ranking accuracy) and the probe's checks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from data import DataError, Problem, format_prompt, load_problems
from flags import OneLineParser, model_error
from verifier import MathVerifier, score_responses

# ---------------------------------------------------------------------------------------------
# Value-model quality (GenAC, arXiv:2604.10701, §4 and Tables 2-4)
#
# A state is a held-out prompt plus a partial response of the policy cut at a segment boundary (the
# segmentation GenAC uses: genac_segments.segment_boundaries). Its ground-truth value is the Monte-Carlo mean
# reward of M continuations sampled from it by the engine. "path" states (every segment start of one
# response per prompt) measure MSE / MAE / Pearson r; "candidate" states (C continuations of one
# prefix, each cut after its first segment) measure relative ranking: top-1 accuracy of picking the
# best of 2 / 4 / 8 candidates. Any value model plugs in as
#     value_fn(problems: list[str], partial_responses: list[str]) -> list[float] in [0, 1].


def value_targets(engine, tokenizer, problems: list[Problem], prompt_ids: list[list[int]], states: list[dict], m: int,
                  max_new_tokens: int, verifier, seed: int) -> None:
    """Monte-Carlo ground truth, in place: state["value"] = mean reward of its m continuations (ONE engine call).

    A state is {"problem_index", "prefix_ids" (response tokens so far), "finished"}; a finished state (the
    response already ended) is worth its own reward. The continuation budget is what the policy had left.
    """
    open_states = [s for s in states if not s["finished"]]
    samples = engine.generate([prompt_ids[s["problem_index"]] + s["prefix_ids"] for s in open_states], m,
                              [max(max_new_tokens - len(s["prefix_ids"]), 1) for s in open_states], 1.0, 1.0, seed)
    texts, owners = [], []
    for s, group in zip(open_states, samples):
        for c in group:
            texts.append(tokenizer.decode(s["prefix_ids"] + c.token_ids, skip_special_tokens=True))
            owners.append(s)
    for s in states:
        if s["finished"]:
            texts.append(tokenizer.decode(s["prefix_ids"], skip_special_tokens=True))
            owners.append(s)
    rewards, _ = score_responses(texts, [problems[s["problem_index"]] for s in owners], verifier)
    for s in states:
        s["continuation_rewards"] = []
    for s, r in zip(owners, rewards):
        s["continuation_rewards"].append(r)
    for s in states:
        s["value"] = sum(s["continuation_rewards"]) / len(s["continuation_rewards"])


def build_value_states(engine, tokenizer, problems: list[Problem], verifier, m: int = 16, candidates: int = 8,
                       rank_prompts: int = 24, segment_tokens: int = 32, max_segments: int = 8,
                       max_new_tokens: int = 128,
                       seed: int = 0) -> list[dict]:
    """-> states: path states of one policy response per problem, candidate groups for the first `rank_prompts`."""
    import random

    from genac_segments import critic_state_prefixes, segment_boundaries, token_texts
    rng = random.Random(seed)
    prompt_ids = [format_prompt(tokenizer, p) for p in problems]
    responses = engine.generate(prompt_ids, 1, max_new_tokens, 1.0, 1.0, seed)  # the policy's own samples
    states: list[dict] = []
    prefixes_for_ranking = []
    for i, group in enumerate(responses):
        ids = group[0].token_ids
        ends = segment_boundaries(token_texts(tokenizer, ids), segment_tokens, max_segments)
        path = critic_state_prefixes(ids, ends) if ends else [[]]
        for k, prefix in enumerate(path):
            states.append({"problem_index": i, "kind": "path", "segment": k, "prefix_ids": prefix, "finished": False})
        if i < rank_prompts:
            prefixes_for_ranking.append((i, path[rng.randrange(len(path))]))
    if prefixes_for_ranking and candidates > 1:  # C first segments from the same prefix
        outs = engine.generate([prompt_ids[i] + prefix for i, prefix in prefixes_for_ranking], candidates,
                               [max(max_new_tokens - len(prefix), 1) for _, prefix in prefixes_for_ranking], 1.0, 1.0,
                               seed + 1)
        for g, ((i, prefix), group) in enumerate(zip(prefixes_for_ranking, outs)):
            for c in group:
                first = segment_boundaries(token_texts(tokenizer, c.token_ids), segment_tokens, max_segments)[:1] or [0]
                cut = first[0]
                finished = cut == len(c.token_ids) and (c.finish_reason == "stop"
                                                        or len(prefix) + cut >= max_new_tokens)
                states.append({"problem_index": i, "kind": "candidate", "group": g,
                               "prefix_ids": prefix + c.token_ids[:cut],
                               "finished": finished})
    value_targets(engine, tokenizer, problems, prompt_ids, states, m, max_new_tokens, verifier, seed + 2)
    for s in states:
        s["problem"] = problems[s["problem_index"]].problem
        s["partial_response"] = tokenizer.decode(s["prefix_ids"], skip_special_tokens=True)
    return states


def ranking_top1(true_values: list[float], predicted: list[float], c: int) -> float:
    """Top-1 accuracy of picking a best candidate, averaged over every c-subset of the candidates.

    Ties in the prediction are a uniformly random pick (a constant model scores chance); any pick whose
    true value equals the subset's best is correct. Example: true [0.1, 0.9, 0.5], predicted [0.2, 0.8, 0.9],
    c = 2: subsets {0,1} right, {0,2} right, {1,2} wrong -> 2/3.
    """
    from itertools import combinations
    scores = []
    for subset in combinations(range(len(true_values)), c):
        best_true = max(true_values[j] for j in subset)
        best_pred = max(predicted[j] for j in subset)
        picks = [j for j in subset if predicted[j] >= best_pred - 1e-12]
        scores.append(sum(true_values[j] >= best_true - 1e-12 for j in picks) / len(picks))
    return sum(scores) / len(scores)


def value_quality(states: list[dict], predictions: list[float], sizes=(2, 4, 8)) -> dict:
    """MSE, MAE, Pearson r on path states; top-1@c over candidate groups with at least c candidates."""
    path = [(s["value"], p) for s, p in zip(states, predictions) if s["kind"] == "path"]
    truth, pred = [t for t, _ in path], [p for _, p in path]
    n = len(path)
    out = {"states": n, "mse": sum((t - p) ** 2 for t, p in path) / n, "mae": sum(abs(t - p) for t, p in path) / n}
    mt, mp = sum(truth) / n, sum(pred) / n
    st = math.sqrt(sum((t - mt) ** 2 for t in truth))
    sp = math.sqrt(sum((p - mp) ** 2 for p in pred))
    out["pearson"] = sum((t - mt) * (p - mp) for t, p in path) / (st * sp) if st > 1e-9 and sp > 1e-9 else float("nan")
    groups: dict[int, list[tuple[float, float]]] = {}
    for s, p in zip(states, predictions):
        if s["kind"] == "candidate":
            groups.setdefault(s["group"], []).append((s["value"], p))
    for c in sizes:
        accs = [ranking_top1([t for t, _ in g], [p for _, p in g], c) for g in groups.values() if len(g) >= c]
        out[f"top1@{c}"] = sum(accs) / len(accs) if accs else float("nan")
    return out


def constant_baselines(states: list[dict]) -> dict[str, list[float]]:
    """The references printed beside every model: the oracle state-zero value of each prompt (knows the
    prompt's true success rate, ignores the partial response) and the dataset mean."""
    zero = {s["problem_index"]: s["value"] for s in states if s["kind"] == "path" and s["segment"] == 0}
    path_values = [s["value"] for s in states if s["kind"] == "path"]
    mean = sum(path_values) / len(path_values)
    return {"oracle state-zero value": [zero[s["problem_index"]] for s in states], "dataset mean": [mean] * len(states)}


def load_or_build_states(cache: Path, meta: dict, build) -> list[dict]:
    """The state set is built once per (policy, data, settings) and cached as JSON (written atomically)."""
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["meta"] != meta:
            raise ValueError(f"{cache} was built with other settings {saved['meta']}; "
                             "pass another --cache or --rebuild")
        print(f"[values] {len(saved['states'])} cached states from {cache}", file=sys.stderr)
        return saved["states"]
    states = build()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "states": states}))
    os.replace(tmp, cache)
    print(f"[values] built {len(states)} states -> {cache}", file=sys.stderr)
    return states


def load_generative_critic(path: str, args, policy_path: str, guided: bool = False,
                           critic_max_new_tokens: int | None = None):
    """GenAC's critic (genac.GenAC, its own vLLM engine) with GenAC's defaults as train.py picks them
    (GenAC.check_arguments: cpu profile for the offline default policy, else the paper's); its prompts are sized for a
    512-token problem prompt + args.max_new_tokens of response. args: policy (as given), engine_dtype, seed,
    max_new_tokens; policy_path: its folder. guided: answers constrained to '<reasoning> \\boxed{0..10}'
    (--critic-guided);
    critic_max_new_tokens: the critic's reasoning budget (None: the profile's)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from flags import SYNC_BUCKET_MB
    from genac import GenAC
    defaults = argparse.ArgumentParser()
    GenAC.add_arguments(defaults)
    defaults.set_defaults(critic_model=path, critic_lr=0.0, weight_decay=0.0, engine="vllm",
                          engine_dtype=args.engine_dtype, seed=args.seed, gpu_memory_utilization=0.2, model=args.policy,
                          icc_carry_over=True, max_prompt_tokens=512, max_new_tokens=args.max_new_tokens,
                          gradient_checkpointing=False, critic_guided=guided,
                          critic_max_new_tokens=critic_max_new_tokens, sync_bucket_mb=SYNC_BUCKET_MB)
    critic_args = defaults.parse_args([])
    GenAC.check_arguments(critic_args)  # the profile follows --policy as given (None: the offline default model)
    with torch.device("meta"):  # the actor's size for the ICC hint
        actor = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy_path))
    return GenAC(critic_args, actor, AutoTokenizer.from_pretrained(policy_path), torch.device("cpu"), 1)


def generative_values(path: str, states: list[dict], problems_text: list[str], partials: list[str],
                      args, policy_path: str) -> list[float]:
    """GenAC's critic through the value-model interface: the mean of --genac-samples answers per state (temperature
    0.6), an unparsable answer valued at tau and counted. Its ICC hint tau is the one it was trained with
    (genac_state.json), else the policy's success rate on these prompts (the mean state-zero value)
    (`load_generative_critic`)."""
    critic = load_generative_critic(path, args, policy_path)
    if critic.success_rate.value is None:
        zero = [s["value"] for s in states if s["kind"] == "path" and s["segment"] == 0]
        critic.success_rate.update([sum(zero) / len(zero)])
    failures, per_state = 0, [[] for _ in problems_text]
    for j in range(args.genac_samples):
        _, _, parsed = critic.judge(problems_text, partials, args.seed + 5 + j, temperature=0.6)
        for i, v in enumerate(parsed):
            failures += v is None
            per_state[i].append(critic.fallback_value() if v is None else v)
    unparsable = failures / max(len(parsed) * args.genac_samples, 1)
    print(f"[values] generative critic {path}: {unparsable:.1%} of answers unparsable "
          f"(valued at tau = {critic.fallback_value():.2f}); {critic.prompts_cut} critic prompts cut to fit",
          file=sys.stderr)
    critic.close()
    return [sum(v) / len(v) for v in per_state]


def values_main(argv: list[str]) -> None:
    """`python eval.py values`: the value-model benchmark (see the section comment above)."""
    ap = OneLineParser(prog="eval.py values", description="Value-model quality against Monte-Carlo values.")
    ap.add_argument("--policy", default=None, help="policy whose values are measured (default: offline SmolLM2-135M)")
    ap.add_argument("--data", default="arithmetic",
                    help="'arithmetic[:levels]' (held-out split) or a JSONL file: OOD is one flag away")
    ap.add_argument("-n", type=int, default=64, help="held-out prompts (one policy response each)")
    ap.add_argument("-m", type=int, default=16, help="Monte-Carlo continuations per state")
    ap.add_argument("--candidates", type=int, default=8, help="candidate segments per ranking prefix")
    ap.add_argument("--rank-prompts", type=int, default=24, help="prompts that get a ranking group")
    ap.add_argument("--segment-tokens", type=int, default=32, help="segment length (GenAC's --segment-tokens)")
    ap.add_argument("--max-segments", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128, help="the policy's response budget")
    ap.add_argument("--critic", action="append", default=[], help="discriminative critic folder, or 'init' (fresh head "
                    "on --critic-base); repeatable")
    ap.add_argument("--critic-base", default=None, help="base model for --critic init (default: the policy)")
    ap.add_argument("--genac", action="append", default=[], help="generative critic folder (`genac.py sft/pretrain`), "
                    "or 'base' (the policy's base model, untrained); repeatable")
    ap.add_argument("--genac-samples", type=int, default=1, help="critic answers averaged per state")
    ap.add_argument("--cache", default=None,
                    help="state-set cache (default: runs/values/<data>-<policy>-n<n>-m<m>.json)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached state set")
    ap.add_argument("--problem-key", default="problem")
    ap.add_argument("--answer-key", default="answer")
    ap.add_argument("--engine-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the table to this JSON file")
    args = ap.parse_args(argv)
    named = [("--policy", args.policy), ("--critic-base", args.critic_base),
             *(("--critic", c) for c in args.critic if c != "init"),
             *(("--genac", g) for g in args.genac if g != "base")]
    if message := next(filter(None, (model_error(flag, value) for flag, value in named)), None):
        sys.exit(f"eval.py values: error: {message}")  # before the heavy imports, named by its own flag
    import torch
    from transformers import AutoTokenizer

    from engine import make_engine
    from rollout import resolve_model_path
    try:
        policy = resolve_model_path(args.policy)
        problems = load_problems(args.data, "benchmark", args.seed, args.problem_key, args.answer_key)[: args.n]
        critic_paths = [c if c == "init" else resolve_model_path(c) for c in args.critic]
        genac_paths = [policy if g == "base" else resolve_model_path(g) for g in args.genac]
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    slug = lambda s: Path(str(s).rstrip("/")).name.replace(":", "_").replace(",", "_")  # noqa: E731
    cache = Path(args.cache or f"runs/values/{slug(args.data)}-{slug(policy)}-n{args.n}-m{args.m}.json")
    if args.rebuild and cache.exists():
        cache.unlink()
    meta = {"policy": policy, "data": args.data, "n": len(problems), "m": args.m, "candidates": args.candidates,
            "rank_prompts": args.rank_prompts, "segment_tokens": args.segment_tokens, "max_segments": args.max_segments,
            "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    tokenizer = AutoTokenizer.from_pretrained(policy)

    def build():
        engine = make_engine("vllm", policy, dtype=args.engine_dtype, seed=args.seed, max_model_len=2048)
        verifier = MathVerifier() if any(p.kind == "math" for p in problems) else None
        try:
            return build_value_states(engine, tokenizer, problems, verifier, args.m, args.candidates, args.rank_prompts,
                                      args.segment_tokens, args.max_segments, args.max_new_tokens, args.seed)
        finally:
            if verifier is not None:
                verifier.close()
            engine.close()

    try:
        states = load_or_build_states(cache, meta, build)
    except ValueError as e:
        sys.exit(f"error: {e}")
    models = dict(constant_baselines(states))
    problems_text, partials = [s["problem"] for s in states], [s["partial_response"] for s in states]
    for spec in critic_paths:
        from critic import discriminative_value_fn, load_value_model
        if spec == "init":
            path = resolve_model_path(args.critic_base) if args.critic_base else policy
        else:
            path = spec
        model = load_value_model(path, torch.device("cpu"), 1, seed=args.seed)
        name = f"critic {'init (fresh head)' if spec == 'init' else spec}"
        models[name] = discriminative_value_fn(model, tokenizer, torch.device("cpu"))(problems_text, partials)
        del model
    for spec, path in zip(args.genac, genac_paths):
        models[f"generative critic {spec}"] = generative_values(path, states, problems_text, partials, args, policy)
    n_path = sum(s["kind"] == "path" for s in states)
    n_groups = len({s["group"] for s in states if s["kind"] == "candidate"})
    print(f"{n_path} path states from {len(problems)} prompts of {args.data}, {n_groups} ranking groups of "
          f"{args.candidates}; "
          f"ground truth = mean reward of {args.m} continuations")
    print("| value model | MSE | MAE | Pearson r | top-1@2 | top-1@4 | top-1@8 |\n|---|---|---|---|---|---|---|")
    results = {}
    for name, predictions in models.items():
        q = results[name] = value_quality(states, predictions)
        cell = lambda x: "—" if x != x else f"{x:.3f}"  # noqa: E731  (nan -> dash)
        print(f"| {name} | {cell(q['mse'])} | {cell(q['mae'])} | {cell(q['pearson'])} | {cell(q['top1@2'])} | "
              f"{cell(q['top1@4'])} | {cell(q['top1@8'])} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


# ---------------------------------------------------------------------------------------------
# POISE's probe: its value against held-out success rates, and the cost of its features


def probe_heldout_quality(run_dir: str, data: str = "arithmetic", num_prompts: int = 100, samples: int = 8,
                    max_new_tokens: int = 128, seed: int = 0) -> dict[str, float]:
    """The authors' headline check: the probe's prompt value vs avg@`samples` of held-out prompts.

    Loads the newest checkpoint of a `--algo poise` run (policy + probe), samples `samples` rollouts per
    held-out prompt at temperature 1, extracts their features with the trainer's forward pass, and
    compares mean_i g(z_i) per prompt with the prompt's observed success rate.
    """
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import actor
    from engine import default_engine, make_engine
    from probe import POISE, probe_quality
    from rollout import build_rollout_batch
    done = sorted(p for p in Path(run_dir).glob("checkpoint-*") if (p / "trainer_state.pt").is_file())
    ckpt = done[-1] if done else None
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)["algorithm"]
    if "poise" not in state:
        raise ValueError(f"{ckpt} was not trained with --algo poise (no probe in its trainer_state.pt)")
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    poise = POISE(run_arguments(run_dir, "poise"), model, tokenizer, None, 1)  # the run's probe layer, pooling
    poise.load_state_dict(state)  # refused, naming the flag, if the checkpoint's features were made otherwise
    problems = load_problems(data, "benchmark", seed)[:num_prompts]
    prompt_ids = [format_prompt(tokenizer, p) for p in problems]
    engine = make_engine(default_engine(), str(ckpt), seed=seed, max_model_len=1024)
    rollouts = engine.generate(prompt_ids, samples, max_new_tokens, 1.0, 1.0, seed)
    engine.close()
    flat = [(p, s) for p, group in enumerate(rollouts) for s in group]
    rewards, _ = score_responses([s.text for _, s in flat], [problems[p] for p, _ in flat], None)
    batch = build_rollout_batch(prompt_ids, rollouts, rewards, tokenizer.pad_token_id)
    passes = SimpleNamespace(micro_batch_size=16, dtype="bf16", share_prompts=False, temperature=1.0)
    features = poise.features(batch, actor.old_logprob_passes(model, batch, passes, torch.device("cpu"),
                                                              hidden_layer=poise.layer))  # [N, F]
    values = poise.baseline.predict_values(features)  # [N]
    count = torch.zeros(len(problems)).index_add_(0, batch.group_index, torch.ones(len(batch)))
    predicted = torch.zeros(len(problems)).index_add_(0, batch.group_index, values.float()) / count  # [P]
    observed = torch.zeros(len(problems)).index_add_(0, batch.group_index, batch.rewards) / count  # [P]
    quality = probe_quality(predicted, observed)
    return {**quality, "prompts": len(problems), "samples": samples, "observed_mean": float(observed.mean()),
            "mae_of_constant": float((observed - observed.mean()).abs().mean())}


def run_arguments(run_dir, algo: str):
    """The train.py arguments a run finished with (its run.json: runrecord.effective_args), so an algorithm built
    from them reads what the run read (POISE's probe layer, pooling and standardisation); a run without run.json (an
    older one): train.py's defaults for `algo`."""
    import argparse

    import runrecord
    from flags import parse_train_args
    record = runrecord.load(run_dir)
    return argparse.Namespace(**runrecord.effective_args(record)) if record else parse_train_args(["--algo", algo])


def probe_feature_cost(repeats: int = 3, rollouts: int = 32, prompt_tokens: int = 45,
                       response_tokens: int = 40) -> dict[str, float]:
    """Seconds of the old-log-prob pass without and with feature extraction on the default workload
    shape (default model, bf16 autocast), alternating to share the machine's noise."""
    import time
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import actor
    from engine import Sample
    from flags import parse_train_args
    from probe import POISE, RidgeProbe
    from rollout import build_rollout_batch, resolve_model_path
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(None), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(None))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 40000, (prompt_tokens,), generator=g).tolist() for _ in range(rollouts // 2)]
    samples = [[Sample(torch.randint(10, 40000, (response_tokens,), generator=g).tolist(), [0.0] * response_tokens,
                       "", "stop")
                for _ in range(2)] for _ in prompts]
    batch = build_rollout_batch(prompts, samples, [0.0] * rollouts, pad_id=2)
    args = SimpleNamespace(micro_batch_size=16, dtype="bf16", share_prompts=False, temperature=1.0)
    poise = POISE(parse_train_args(["--algo", "poise"]), model, tokenizer, None, 1)  # train.py's POISE
    cpu = torch.device("cpu")
    plain, with_features = [], []
    actor.compute_old_logprobs(model, batch, args, cpu)  # warm-up
    for _ in range(repeats):
        for features, out in ((False, plain), (True, with_features)):
            start = time.perf_counter()
            if features:
                poise.features(batch, actor.old_logprob_passes(model, batch, args, cpu, hidden_layer=poise.layer))
            else:
                actor.compute_old_logprobs(model, batch, args, cpu)
            out.append(time.perf_counter() - start)
    base, feat = min(plain), min(with_features)
    H = model.config.hidden_size  # the closed-form refit at a full buffer of 4096 rows
    rows, targets = torch.randn(4096, 2 * H + 3, generator=g), torch.rand(4096, generator=g)
    refits = []
    for _ in range(repeats):
        start = time.perf_counter()
        RidgeProbe(H).fit(rows, targets)
        refits.append(time.perf_counter() - start)
    return {"old_logprob_s": base, "old_logprob_with_features_s": feat, "overhead": feat / base - 1,
            "refit_4096_rows_s": min(refits)}
