"""Evaluation: avg@k and unbiased pass@k on benchmarks, and plots of a run's metrics.

    python eval.py --model runs/default/checkpoint-000024 --data arithmetic -k 4
    python eval.py --data data/math500.jsonl --data data/amc23.jsonl -k 16
    python eval.py plot runs/default                  # PNGs from runs/default/metrics.jsonl
    python eval.py summary runs/default               # the README's benchmark table from metrics.jsonl
    python eval.py compare runs/sweep --baseline grpo # runs grouped by configuration: seeds, intervals, plot
                                                      # (tools/compare.py)
    python eval.py speed                              # each phase next to its bare counterpart (tools/speed.py)
    python eval.py memory --model CONFIG --world 8    # per-GPU memory plan, any HF config, no weights read (memory.py)
    python eval.py memory --rehearse --model CONFIG --algo genac --world 8   # the trainer's phases on fake tensors,
                                                      # measured beside the plan (tools/rehearse.py)
    python eval.py export runs/grpo/checkpoint-000010 OUT   # sharded checkpoint -> Hugging Face folder (checkpoint.py)
    python eval.py values --critic init --critic runs/vcppo/critic-pretrained   # value-model quality (GenAC §4)
    python eval.py probe runs/poise                   # POISE's probe value vs held-out avg@8; --cost: its overhead
    (values and probe live in tools/values.py)
    python eval.py baselines --prompts 100            # all seven algorithms' baselines vs Monte-Carlo V(x)
                                                      # (tools/baselines.py)

avg@k  = mean over problems of (correct samples / k)                      (the papers use k = 16)
pass@k = mean over problems of 1 - C(n - c, k) / C(n, k), with n samples and c correct (Chen et al.
         2021's unbiased estimator; with n = k it is "any of the k samples is correct").
Validation sampling: temperature 0.6, top-p 0.95 (GenAC Table 5, arXiv:2604.10701).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from data import DataError, load_problems
from algo_flags import number
from flags import OneLineParser, model_error


# ---------------------------------------------------------------------------------------------
# Plots


PLOTS = {
    "reward": ["reward"],
    "heldout_accuracy": ["eval/avg_at_k", "eval/pass_at_k"],
    "response_length": ["response_length"],
    "entropy": ["entropy"],
    "phase_seconds": ["time/generate", "time/score", "time/old_logprob", "time/update", "time/sync"],
}


def plot_run(run_dir: str) -> list[Path]:
    """One PNG per panel of PLOTS from run_dir/metrics.jsonl -> the written paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    written = []
    for name, keys in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drew = False
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, label=key)
                drew = True
        if not drew:
            plt.close(fig)
            continue
        ax.set_xlabel("step"), ax.set_title(name), ax.grid(alpha=0.3), ax.legend(fontsize=8)
        fig.tight_layout()
        target = Path(run_dir) / f"{name}.png"
        fig.savefig(target, dpi=100)
        plt.close(fig)
        written.append(target)
    return written


# ---------------------------------------------------------------------------------------------
# Benchmark summary of a run (the README's table)


def run_summary(run_dir: str) -> dict:
    """Throughput and accuracy of a run from run_dir/metrics.jsonl (RL steps only).

    tokens/s are ratios of sums (all tokens / all seconds of that phase), so long steps weigh as they
    cost; `*_step_mean` is the plain mean of the per-step rates for comparison."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r.get("phase", "rl") == "rl" and "time/step" in r]
    if not steps:
        raise ValueError(f"{path} has no RL steps")
    total = lambda key: sum(r.get(key, 0.0) for r in steps)  # noqa: E731
    mean = lambda key: total(key) / len(steps)  # noqa: E731
    evals = [r for r in rows if "eval/avg_at_k" in r]
    out = {"steps": len(steps), "seconds_in_steps": total("time/step"),
           **{f"seconds_per_step/{k}": mean(f"time/{k}")
              for k in ("generate", "score", "old_logprob", "update", "sync", "step")},
           "sync_max": max(r["time/sync"] for r in steps),
           "generate_tokens_per_s": total("generated_tokens") / max(total("time/generate"), 1e-9),
           "train_tokens_per_s": total("trained_tokens") / max(total("time/update"), 1e-9),
           "generate_tokens_per_s_step_mean": mean("tokens_per_s/generate"),
           "train_tokens_per_s_step_mean": mean("tokens_per_s/train"),
           "response_length": mean("response_length"),
           "logprob_diff_engine_trainer": mean("logprob_diff_engine_trainer")}
    if evals:
        out.update({"avg_at_k_before": evals[0]["eval/avg_at_k"], "avg_at_k_after": evals[-1]["eval/avg_at_k"],
                    "pass_at_k_before": evals[0]["eval/pass_at_k"], "pass_at_k_after": evals[-1]["eval/pass_at_k"],
                    "eval_k": evals[0].get("eval/k"), "eval_problems": evals[0].get("eval/problems")})
    return out


def print_summary(run_dir: str) -> None:
    s = run_summary(run_dir)
    print(f"| {run_dir} | |\n|---|---|")
    if "avg_at_k_before" in s:
        print(f"| held-out avg@{s['eval_k']} ({s['eval_problems']} problems), before -> after | "
              f"{s['avg_at_k_before']:.3f} -> {s['avg_at_k_after']:.3f} |")
        print(f"| held-out pass@{s['eval_k']}, before -> after | "
              f"{s['pass_at_k_before']:.3f} -> {s['pass_at_k_after']:.3f} |")
    phases = " / ".join(f"{s[f'seconds_per_step/{k}']:.2f}"
                        for k in ("generate", "score", "old_logprob", "update", "sync", "step"))
    print(f"| {s['steps']} steps, {s['seconds_in_steps'] / 60:.1f} min; seconds per step: generate / score / "
          f"old log-probs / update / sync / total | {phases} |")
    print(f"| generated tokens/s (all steps; mean of steps) | {s['generate_tokens_per_s']:.0f}; "
          f"{s['generate_tokens_per_s_step_mean']:.0f} |")
    print(f"| trained tokens/s: rollout prompt + response tokens / update seconds (all steps; mean of steps) | "
          f"{s['train_tokens_per_s']:.0f}; {s['train_tokens_per_s_step_mean']:.0f} |")
    print(f"| weight sync, mean (max) | {s['seconds_per_step/sync']:.2f} s ({s['sync_max']:.2f} s) |")
    print(f"| mean response length; mean abs engine - trainer log-prob | {s['response_length']:.1f}; "
          f"{s['logprob_diff_engine_trainer']:.3f} |")


# ---------------------------------------------------------------------------------------------
# Speed of the two halves of a step, outside the RL loop


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:  # python eval.py probe RUN_DIR [--data D -n N -k K] | python eval.py probe --cost
        ap = OneLineParser(prog="eval.py probe", description="POISE probe vs held-out avg@k; --cost: feature overhead")
        ap.add_argument("run_dir", nargs="?")
        ap.add_argument("--data", default="arithmetic")
        ap.add_argument("-n", type=number(int, 1), default=100, help="held-out prompts")
        ap.add_argument("-k", type=number(int, 1), default=8, help="samples per prompt")
        ap.add_argument("--cost", action="store_true",
                        help="seconds the features add to the old-log-prob pass, refit at 4096 rows")
        pa = ap.parse_args(argv[1:])
        if not pa.cost and not pa.run_dir:
            ap.error("give a --algo poise run folder, or --cost")
        if pa.run_dir and not Path(pa.run_dir).is_dir():
            sys.exit(f"eval.py probe: error: {pa.run_dir}: no such run folder; give a --algo poise run's --out")
        from tools.values import probe_feature_cost, probe_heldout_quality
        print(json.dumps(probe_feature_cost() if pa.cost else probe_heldout_quality(pa.run_dir, pa.data, pa.n, pa.k),
                         indent=1))
        return
    if argv[:1] == ["values"]:
        from tools.values import values_main
        return values_main(argv[1:])
    # every algorithm's baseline vs Monte-Carlo V(x), per generated token (tools/baselines.py)
    if argv[:1] == ["baselines"]:
        from tools.baselines import baselines_main
        return baselines_main(argv[1:])
    if argv[:1] == ["speed"]:
        from tools.speed import speed_main
        return speed_main(argv[1:])
    if argv[:1] == ["memory"] and "--rehearse" in argv:  # the plan beside the trainer's code on fake tensors
        from tools.rehearse import main as rehearse_main
        return rehearse_main([a for a in argv[1:] if a != "--rehearse"])
    if argv[:1] == ["memory"]:  # the per-GPU memory plan of a configuration (memory.py)
        from memory import memory_main
        return memory_main(argv[1:])
    # python eval.py export CHECKPOINT [OUT]: the Hugging Face folder(s) of a sharded checkpoint
    if argv[:1] == ["export"]:
        if len(argv) not in (2, 3):
            sys.exit("usage: python eval.py export CHECKPOINT [OUT]   (default OUT: the checkpoint itself)")
        if not (Path(argv[1]) / "sharded" / ".metadata").is_file():
            sys.exit(f"eval.py export: error: {argv[1]} is no train.py checkpoint (no sharded/.metadata); give a "
                     "run's checkpoint-N folder")
        from checkpoint import export_checkpoint
        try:
            for folder in export_checkpoint(argv[1], argv[2] if len(argv) == 3 else None):
                print(folder)
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
        return
    if argv[:1] == ["compare"]:
        from tools.compare import compare_main
        return compare_main(argv[1:])
    if argv[:1] == ["summary"]:
        for run_dir in argv[1:] or ["runs/default"]:
            try:
                print_summary(run_dir)
            except (FileNotFoundError, ValueError) as e:
                sys.exit(f"error: {e}")
        return
    if argv[:1] == ["plot"]:
        for run_dir in argv[1:] or ["runs/default"]:
            try:
                for p in plot_run(run_dir):
                    print(p)
            except FileNotFoundError as e:
                sys.exit(f"error: {e}")
        return
    ap = OneLineParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: offline SmolLM2-135M-Instruct)")
    ap.add_argument("--data", action="append", default=None,
                    help="'arithmetic[:levels]' (held-out split) or a JSONL file; repeatable")
    ap.add_argument("-k", type=number(int, 1), default=4, help="samples per problem")
    ap.add_argument("-n", type=number(int, 0), default=200, help="problems per data set (0: all)")
    ap.add_argument("--max-new-tokens", type=number(int, 1), default=128)
    ap.add_argument("--engine", default=None, choices=("vllm", "hf"))
    ap.add_argument("--engine-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--problem-key", default="problem")
    ap.add_argument("--answer-key", default="answer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    # every input checked before the heavy imports (torch, vLLM: seconds) and before evaluating (minutes)
    if message := model_error("--model", args.model) or json_target_error(args.json):
        sys.exit(f"eval.py: error: {message}")
    try:
        datasets = {spec: load_problems(spec, "benchmark", args.seed, args.problem_key, args.answer_key)
                    for spec in (args.data or ["arithmetic"])}
    except DataError as e:
        sys.exit(f"eval.py: error: --data: {e}")
    from transformers import AutoTokenizer

    from engine import default_engine, make_engine
    from rollout import evaluate, resolve_model_path
    from verifier import MathVerifier
    try:
        model_path = resolve_model_path(args.model)
    except FileNotFoundError as e:
        sys.exit(f"eval.py: error: {e}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine = make_engine(args.engine or default_engine(), model_path, dtype=args.engine_dtype, seed=args.seed,
                         max_model_len=4096 if args.max_new_tokens < 3000 else args.max_new_tokens + 1024)
    verifier = MathVerifier() if any(p.kind == "math" for ps in datasets.values() for p in ps) else None
    results = {}
    print(f"| data | problems | avg@{args.k} | pass@{args.k} |\n|---|---|---|---|")
    for spec, problems in datasets.items():
        problems = problems[: args.n] if args.n else problems
        r = evaluate(engine, tokenizer, problems, args.k, args.max_new_tokens, verifier, seed=args.seed)
        results[spec] = r
        print(f"| {spec} | {r['problems']} | {r['avg_at_k']:.4f} | {r['pass_at_k']:.4f} |", flush=True)
    if len(results) > 1:
        print(f"| average | | {sum(r['avg_at_k'] for r in results.values()) / len(results):.4f} | "
              f"{sum(r['pass_at_k'] for r in results.values()) / len(results):.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if verifier is not None:
        verifier.close()
    engine.close()


def json_target_error(path: str | None) -> str | None:
    """Why --json could not be written after the evaluation (a missing or read-only folder, a folder in its place)."""
    if path is None:
        return None
    target, folder = Path(path), Path(path).absolute().parent
    if target.is_dir():
        return f"--json {path} is a folder; give a file name"
    if not folder.is_dir():
        return f"--json {path}: no folder {folder}; create it first or write elsewhere"
    if not os.access(folder, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        return f"--json {path}: cannot write there; choose another file"
    return None


if __name__ == "__main__":
    main()
