"""How far each phase of a training step is from its limit (`python eval.py speed`).

In one process, on one batch, each phase next to its bare counterpart:

    generation  the loop's engine call (engine.VLLMEngine.generate: sampled log-probs, Sample objects) vs a bare
                vLLM `LLM.generate` of the same prompts, n, max_tokens and temperature (no log-probs), per shape
    update      the loop's update (update.ppo_update: the old-log-prob pass where it is needed, PPO-clip loss,
                normaliser, metrics, gradient clipping, optimizer steps) vs a bare forward+backward of the same
                micro-batches (same rows, same shared-prompt packing, a trivial loss) and the same optimizer steps;
                and the update as it was before the on-policy shortcut (a separate no-grad pass first)

overhead = loop seconds / bare seconds - 1. Each measurement alternates with its counterpart `--repeats` times
(this CPU's speed drifts by 30% within an hour: compare numbers of one run only).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def bare_generate(engine, prompt_ids: list[list[int]], n: int, max_tokens: int) -> int:
    """vLLM's own call, nothing around it. -> generated tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=None)
    outputs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
    return sum(len(c.token_ids) for out in outputs for c in out.outputs)


def bare_update(model, optimizer, batch, steps: list[torch.Tensor], size: int, share: bool, args, device) -> None:
    """Forward + backward of the loop's micro-batches with a trivial loss, one optimizer step per mini-batch."""
    import actor
    import packing
    for mini in steps:
        optimizer.zero_grad(set_to_none=True)
        mini_batch = batch.select(mini)
        for idx in packing.rollout_micro_batches(mini_batch, size, share):
            mb = mini_batch.select(idx)
            if share and mb.group_index.unique().numel() < len(mb):
                inputs, _, _ = packing.pack_shared_prompts(mb)
            else:
                inputs = dict(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                              position_ids=(mb.attention_mask.cumsum(1) - 1).clamp(min=0))
            keep = inputs["input_ids"].shape[1] - mb.prompt_width + 1
            with actor.autocast_context(args, device):
                logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
            logits.float().logsumexp(-1).mean().backward()
        optimizer.step()


def speed_main(argv: list[str]) -> None:
    from transformers import AutoTokenizer

    import actor
    from data import DataError, format_prompt, load_problems
    from engine import make_engine
    from flags import add_update_arguments
    from rollout import build_rollout_batch, resolve_model_path
    from update import UpdateSettings, mini_batch_indices, ppo_update
    from verifier import MathVerifier, score_responses
    ap = argparse.ArgumentParser(prog="eval.py speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default="arithmetic", help="'arithmetic' or a JSONL file of problems")
    ap.add_argument("--shapes", default="8x4,4x8,16x8",
                    help="prompts x samples per engine call; the first is the update's batch")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--mini-batches", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    pa = ap.parse_args(argv)
    try:
        shapes = [(int(p), int(n)) for p, n in (shape.split("x") for shape in pa.shapes.split(","))]
        model_path = resolve_model_path(pa.model)
        problems = load_problems(pa.data, "train", 0)
    except (DataError, FileNotFoundError) as e:  # a missing model or data file, a malformed row: say which
        sys.exit(f"error: {e}")
    except ValueError:
        sys.exit(f"error: --shapes {pa.shapes!r}: expected prompts x samples, e.g. 8x4,16x8")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # a JSONL of math problems: math-verify
    verifier = MathVerifier() if any(p.kind == "math" for p in problems) else None
    engine = make_engine("vllm", model_path, dtype="bfloat16", seed=0, max_model_len=1024 + pa.max_new_tokens)
    engine.generate([format_prompt(tokenizer, problems[0])], 1, 8, 1.0, 1.0, 0)  # warm-up
    print(f"| generation: prompts x samples (≤ {pa.max_new_tokens} new tokens) | loop tokens/s | bare vLLM tokens/s "
          "| loop overhead | scoring s |\n|---|---|---|---|---|", flush=True)
    first = None
    for prompts, n in shapes:
        chosen = problems[:prompts]
        prompt_ids = [format_prompt(tokenizer, p) for p in chosen]
        loop_rate, bare_rate = [], []
        for r in range(pa.repeats):
            start = time.time()
            samples = engine.generate(prompt_ids, n, pa.max_new_tokens, 1.0, 1.0, seed=r)
            loop_rate.append(sum(len(s.token_ids) for g in samples for s in g) / (time.time() - start))
            start = time.time()
            bare_rate.append(bare_generate(engine, prompt_ids, n, pa.max_new_tokens) / (time.time() - start))
        start = time.time()
        rewards, _ = score_responses([s.text for g in samples for s in g],
                                     [p for p, g in zip(chosen, samples) for _ in g], verifier)
        scoring = time.time() - start
        loop, bare = sum(loop_rate) / len(loop_rate), sum(bare_rate) / len(bare_rate)
        print(f"| {prompts} x {n} | {loop:.0f} | {bare:.0f} | {loop and bare / loop - 1:+.0%} | {scoring:.2f} |",
              flush=True)
        if first is None:
            first = build_rollout_batch(prompt_ids, samples, rewards, tokenizer.pad_token_id)
    engine.close()
    if verifier is not None:
        verifier.close()

    device = torch.device("cpu")
    model = actor.load_actor(model_path, device, 1)
    optimizer = actor.adamw(model.parameters(), lr=1e-7, weight_decay=0.0)  # tiny steps: the batch stays on-policy
    update_defaults = argparse.ArgumentParser()
    add_update_arguments(update_defaults)  # train.py's update flags and defaults
    update_defaults.set_defaults(seed=0, temperature=1.0)
    run_args = update_defaults.parse_args(["--micro-batch-size", str(pa.micro_batch_size),
                                           "--mini-batches", str(pa.mini_batches)])
    settings = UpdateSettings.of(run_args)
    first.advantages = (first.rewards - first.rewards.mean())[:, None] * first.response_mask
    steps = mini_batch_indices(first, pa.mini_batches, torch.Generator().manual_seed(0))
    tokens = float(first.attention_mask.sum())

    def loop_update(separate_pass: bool) -> float:
        first.old_logprobs = first.entropies = None
        start = time.time()
        if separate_pass:  # before the on-policy shortcut: a no-grad pass over every rollout first
            actor.compute_old_logprobs(model.eval(), first, settings, device)
        ppo_update(model.train(), optimizer, first, settings, device, 1)
        return time.time() - start

    def bare() -> float:
        start = time.time()
        bare_update(model.train(), optimizer, first, steps, pa.micro_batch_size, run_args.share_prompts, run_args,
                    device)
        return time.time() - start

    loop_update(False), bare()  # warm-up
    seconds = {"loop": [], "bare": [], "separate": []}
    for _ in range(pa.repeats):
        seconds["loop"].append(loop_update(False))
        seconds["bare"].append(bare())
        seconds["separate"].append(loop_update(True))
    mean = {k: sum(v) / len(v) for k, v in seconds.items()}
    print(f"\n| update of {len(first)} rollouts, {int(tokens)} prompt + response tokens, "
          f"{pa.mini_batches} mini-batch(es), micro-batch {pa.micro_batch_size} | seconds | rollout tokens/s | "
          "vs bare |\n|---|---|---|---|")
    for name, label in (("bare", "bare forward + backward + optimizer step"),
                        ("loop", "the loop's update (update.ppo_update)"),
                        ("separate", "the loop's update after a separate old-log-prob pass (before the shortcut)")):
        print(f"| {label} | {mean[name]:.2f} | {tokens / mean[name]:.0f} | {mean[name] / mean['bare'] - 1:+.0%} |",
              flush=True)
