"""The one training loop: eval -> generate (vLLM) -> score -> old log-probs -> advantages -> update -> sync.

Every algorithm is "PPO with a different advantage" (SPEC §1); `--algo` only picks how advantages
(and any auxiliary model) are computed:

    grpo   (r - mean) / (std + 1e-6) per prompt group; --no-std gives Dr.GRPO        advantage.py
    rloo   r_i - mean_{j != i} r_j                                                     advantage.py
    v05    generalist value prior fused with sparse rollouts, OSLA extra rollouts     prior.py
    poise  hidden-state probe, cross-rollout baselines, 2 rollouts per prompt         probe.py
    ppo    discriminative critic V_t, token-level GAE, batch-whitened                 critic.py
    vcppo  ppo after --critic-warmup-steps of value pretraining on the frozen actor    critic.py
    genac  generative critic judges each segment's state in text, ICC hints, GAE       genac.py
  --clip-high 0.28 on any of them is DAPO's clip-higher.

Run it:
    python train.py                                   # GRPO, SmolLM2-135M (offline), arithmetic, CPU
    python train.py --algo rloo --steps 50 --out runs/rloo
    torchrun --nproc_per_node=8 train.py --algo grpo --model Qwen/Qwen2.5-Math-1.5B \
        --data train.jsonl --eval-data math500.jsonl --lr 1e-6 --max-new-tokens 2048     # one 8-GPU node
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$RANK --master_addr=$ADDR --master_port=29500 \
        train.py ...                                                                      # two nodes
    python train.py --out runs/grpo --resume          # continue exactly where it stopped
    python eval.py plot runs/grpo                     # PNG curves from runs/grpo/metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import advantage as adv_math
from actor import (adamw, all_gather_objects, all_reduce, compute_old_logprobs, full_optimizer_state_dict, full_state_dict,
                   load_actor, load_full_optimizer_state_dict, ppo_update)
from rollout import (DataError, MathVerifier, Problem, RolloutBatch, build_rollout_batch, default_engine, format_prompt,
                     load_problems, make_engine, resolve_model_path, score_responses)

ALGOS = ("grpo", "rloo", "v05", "poise", "ppo", "vcppo", "genac")
CRITIC_ALGOS = ("ppo", "vcppo", "genac")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--algo", default="grpo", help=f"one of {', '.join(ALGOS)}")
    a("--model", default=None, help="HF causal LM folder or name (default: offline SmolLM2-135M-Instruct)")
    a("--data", default="arithmetic", help="'arithmetic[:levels]', a JSONL file, or a HF dataset name")
    a("--eval-data", default=None, help="held-out set (default: the held-out split of the arithmetic task)")
    a("--problem-key", default="problem", help="JSONL field holding the question")
    a("--answer-key", default="answer", help="JSONL field holding the reference answer")
    a("--out", default="runs/default", help="run folder: metrics.jsonl, checkpoints, plots")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    a("--seed", type=int, default=0)
    a("--steps", type=int, default=30, help="RL iterations")
    a("--prompts-per-step", type=int, default=4, help="prompts per iteration (over all ranks)")
    a("--rollouts-per-prompt", type=int, default=8, help="G; poise defaults to 2, v05 uses --v05-n0")
    a("--max-new-tokens", type=int, default=128)
    a("--max-prompt-tokens", type=int, default=512, help="longer prompts are an error")
    a("--temperature", type=float, default=1.0)
    a("--top-p", type=float, default=1.0)
    a("--lr", type=float, default=2e-5, help="actor lr (SPEC: 1e-6 for real models; the 135M CPU default uses more)")
    a("--weight-decay", type=float, default=0.01)
    a("--grad-clip", type=float, default=1.0)
    a("--clip-low", type=float, default=0.2)
    a("--clip-high", type=float, default=0.2, help="0.28 = DAPO clip-higher")
    a("--loss-agg", default="token-mean", choices=adv_math.LOSS_AGG_MODES)
    a("--no-std", action="store_true", help="GRPO without std normalisation (Dr.GRPO)")
    a("--kl-coef", type=float, default=0.0, help="k3 KL to the initial model (0: no reference model loaded)")
    a("--ppo-epochs", type=int, default=1)
    a("--mini-batches", type=int, default=2, help="optimizer steps per epoch (verl: batch / ppo_mini_batch_size)")
    a("--micro-batch-size", type=int, default=16, help="rollouts per forward/backward")
    a("--no-share-prompts", dest="share_prompts", action="store_false", help="run every rollout's prompt in the "
      "trainer's forward passes (default: a prompt once per micro-batch for all its rollouts; same log-probs)")
    a("--dtype", default="bf16", choices=("bf16", "fp32"), help="training autocast dtype (master weights fp32)")
    a("--engine", default=None, choices=("vllm", "hf"), help="generation engine (default: vllm if it imports)")
    a("--engine-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    a("--gpu-memory-utilization", type=float, default=0.3)
    a("--verifier-timeout", type=float, default=5.0, help="seconds per math answer (timeouts score 0)")
    a("--eval-every", type=int, default=0, help="evaluate every N steps (0: only before and after training)")
    a("--eval-n", type=int, default=200, help="held-out problems per evaluation")
    a("--eval-k", type=int, default=4, help="samples per problem (avg@k, pass@k)")
    a("--no-eval", action="store_true", help="skip the evaluations before and after training")
    a("--token-budget", type=int, default=0, help="stop once this many tokens were generated (0: no budget); "
      "for comparing algorithms at equal generation cost")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--keep-checkpoints", type=int, default=2)
    # V0.5
    a("--v05-n0", type=int, default=4, help="first-round rollouts per prompt")
    a("--v05-kmax", type=int, default=16)
    a("--v05-cost", type=float, default=0.0039, help="OSLA marginal cost c; K_max = 1/sqrt(c)")
    a("--v05-pad", type=int, default=4, help="extra rollouts are rounded up to a multiple of this")
    a("--v05-min-frac", type=float, default=0.1, help="stop when fewer prompts than this share want more")
    a("--v05-fixed", type=int, default=None, help="static ablation: fuse with exactly K rollouts, no OSLA")
    a("--v05-std", default="bernoulli", choices=("bernoulli", "none"))
    a("--prior-embedder", default=None, help="embedding model folder for the prior (default: all-MiniLM-L6-v2)")
    a("--prior-pooling", default="mean", choices=("mean", "last"), help="'last' for Qwen3-Embedding-style models")
    # PPO / VC-PPO / GenAC
    a("--critic-model", "--critic", default=None, help="critic to start from (default: the actor's base model); PPO "
      "replaces its LM head by a scalar head, GenAC keeps it (pass a `genac.py sft/pretrain` folder)")
    a("--gamma", type=float, default=1.0, help="GAE discount")
    a("--lam", type=float, default=1.0, help="GAE lambda of the actor's advantages (VC-PPO's critic always uses 1)")
    a("--value-clip", type=float, default=0.5)
    a("--critic-warmup-steps", type=int, default=None, help="critic-only iterations on the frozen actor before RL "
      "(value pretraining; default 6 for vcppo, 0 for ppo)")
    # GenAC (and --critic-lr for every critic)
    from genac import add_critic_arguments
    add_critic_arguments(a)
    # POISE
    a("--probe-layer", type=int, default=None, help="decoder layer for features (default 0.55 x depth)")
    a("--probe-bootstrap-steps", type=int, default=16, help="RLOO steps that fill the probe's buffer")
    args = p.parse_args(argv)
    if args.algo not in ALGOS:
        p.error(f"unknown --algo {args.algo!r}; choose one of {', '.join(ALGOS)}")
    given = " ".join(argv if argv is not None else sys.argv)
    if args.algo == "poise" and "--rollouts-per-prompt" not in given:  # POISE: G = 2, same rollout budget
        args.rollouts_per_prompt = 2
        if "--prompts-per-step" not in given:
            args.prompts_per_step *= 4
    if args.critic_lr is None:
        args.critic_lr = 1e-6 if args.algo == "genac" else 5e-6
    if args.critic_warmup_steps is None:
        args.critic_warmup_steps = 6 if args.algo == "vcppo" else 0
    if args.critic_warmup_steps and args.algo not in ("ppo", "vcppo"):
        p.error("--critic-warmup-steps is value pretraining of PPO's critic (--algo ppo or vcppo); GenAC pretrains "
                "with `python genac.py pretrain`")
    if args.rollouts_per_prompt < 2 and args.algo in ("grpo", "rloo", "poise"):
        p.error("--rollouts-per-prompt must be >= 2 for group baselines")
    return args


# ---------------------------------------------------------------------------------------------
# Distributed setup and the actor


def setup_distributed():
    """-> (rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is rank 0 of 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# ---------------------------------------------------------------------------------------------
# Algorithms: how each one turns rewards (and features) into advantages


class Algorithm:
    """The per-algorithm state the loop keeps (prior, probe); one small class, no hierarchy."""

    def __init__(self, args, model_config, device=None, world: int = 1, critic_path: str | None = None, tokenizer=None,
                 actor_parameters: int | None = None):
        self.args, self.device, self.world, self.tokenizer = args, device, world, tokenizer
        self.prior = self.poise = self.critic = None
        self.probe_layer = None
        if args.algo in ("ppo", "vcppo"):
            from critic import ValueCritic
            self.critic = ValueCritic(critic_path, device, world, lr=args.critic_lr, weight_decay=args.weight_decay, seed=args.seed)
        if args.algo == "genac":
            from genac import GenerativeCritic
            self.critic = GenerativeCritic(critic_path, device, world, args, actor_parameters)
        if args.algo == "v05":
            from prior import ValuePrior
            self.prior = ValuePrior(embedder_path=args.prior_embedder, pooling=args.prior_pooling, seed=args.seed)
        if args.algo == "poise":
            from probe import PoiseBaseline, probe_layer_index
            layers = model_config.num_hidden_layers
            self.probe_layer = args.probe_layer if args.probe_layer is not None else probe_layer_index(layers)
            if not 0 <= self.probe_layer < layers:
                raise ValueError(f"--probe-layer {self.probe_layer} out of range for a {layers}-layer model")
            self.poise = PoiseBaseline(prompt_dim=model_config.hidden_size, bootstrap_steps=args.probe_bootstrap_steps)

    def advantages(self, batch: RolloutBatch, osla=None, problems=None) -> tuple[torch.Tensor, dict]:
        """-> token advantages [N, R] of this rank's rollouts, metrics. Group and batch statistics are global."""
        if self.args.algo == "genac":  # segment values v_k from the critic's text -> GAE (lambda = 1: A = r - v_k)
            from critic import whitened_gae
            from genac import segment_values
            token_values, metrics = segment_values(self.critic, batch, problems, self.tokenizer, seed=batch.extras["step"] * 31 + 5)
            advantages, gae_metrics = whitened_gae(batch, token_values, self.args, returns_lambda=self.args.lam)
            return advantages, {**metrics, **gae_metrics}
        if self.critic is not None:
            from critic import critic_gae_advantages
            return critic_gae_advantages(self.critic, batch, self.args, self.device)
        sequence_advantages, metrics = self.sequence_advantages(batch, osla)  # [N]
        return adv_math.broadcast_to_tokens(sequence_advantages, batch.response_mask), metrics

    def sequence_advantages(self, batch: RolloutBatch, osla=None) -> tuple[torch.Tensor, dict]:
        """-> sequence advantages [N] of this rank's rollouts, metrics."""
        args = self.args
        if args.algo == "grpo":
            return adv_math.grpo_advantages(batch.rewards, batch.group_index, use_std=not args.no_std), {}
        if args.algo == "rloo":
            return adv_math.rloo_advantages(batch.rewards, batch.group_index), {}
        if args.algo == "v05":
            from prior import v05_advantages
            scores, group_index = osla.flat_scores()
            return v05_advantages(scores, group_index, osla.fused_baseline, args.v05_std).float(), {}
        if args.algo == "poise":  # one probe for all ranks: every rank fits it on all rows, keeps its own
            rows = all_gather_objects((batch.features, batch.rewards, batch.group_index))
            group_offsets = [0]
            for _, _, groups in rows:
                group_offsets.append(group_offsets[-1] + int(groups.max()) + 1)
            features = torch.cat([f for f, _, _ in rows])  # [N_all, F]
            rewards = torch.cat([r for _, r, _ in rows])  # [N_all]
            group_index = torch.cat([g + off for (_, _, g), off in zip(rows, group_offsets)])  # [N_all]
            advantages, metrics = self.poise.advantages(features, rewards, group_index)
            rank = dist.get_rank() if dist.is_initialized() else 0
            first = sum(len(r) for _, r, _ in rows[:rank])
            return advantages[first:first + len(batch)].float(), metrics
        raise ValueError(args.algo)

    def state_dict(self) -> dict:
        """Everything but the critic's weights (save_checkpoint writes those as a model folder). All ranks call."""
        state = {}
        if self.critic is not None:
            state["critic_optimizer"] = full_optimizer_state_dict(self.critic.model, self.critic.optimizer)
        if self.prior is not None:
            state["prior"] = self.prior.state_dict()
        if self.poise is not None:
            state["poise"] = self.poise.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.critic is not None and "critic_optimizer" in state:
            load_full_optimizer_state_dict(self.critic.model, self.critic.optimizer, state["critic_optimizer"])
        if self.prior is not None and "prior" in state:
            self.prior.load_state_dict(state["prior"])
        if self.poise is not None and "poise" in state:
            self.poise.load_state_dict(state["poise"])


def generate_rollouts(engine, algo: Algorithm, problems: list[Problem], prompt_ids: list[list[int]], args, seed: int,
                      verifier) -> tuple[list, list[float], object, dict]:
    """-> (samples[prompt][i], flat rewards, OSLA result or None, metrics). V0.5 samples in rounds."""
    metrics = {"score_timeouts": 0, "empty_responses": 0, "truncated": 0, "time/score": 0.0}

    def sample(counts: list[int], round_seed: int):
        samples = engine.generate(prompt_ids, counts, args.max_new_tokens, args.temperature, args.top_p, round_seed)
        t = time.time()
        flat = [(p, s) for p, group in enumerate(samples) for s in group]
        rewards, st = score_responses([s.text for _, s in flat], [problems[p] for p, _ in flat], verifier,
                                      [s.finish_reason for _, s in flat])
        metrics["time/score"] += time.time() - t
        metrics["score_timeouts"] += st.timeouts
        metrics["empty_responses"] += st.empty_responses
        metrics["truncated"] += st.truncated
        return samples, rewards

    if algo.prior is None:
        samples, rewards = sample([args.rollouts_per_prompt] * len(prompt_ids), seed)
        return samples, rewards, None, metrics

    from prior import osla_metrics, prior_metrics, sample_with_osla
    prior_values = algo.prior.predict([p.problem for p in problems])  # [P] in [0, 1]
    all_samples: list[list] = [[] for _ in prompt_ids]
    round_no = [0]

    def sample_round(wanted: list[int]) -> list[list[float]]:
        samples, rewards = sample(wanted, seed + 104729 * round_no[0])
        round_no[0] += 1
        out, k = [], 0
        for p, group in enumerate(samples):
            all_samples[p].extend(group)
            out.append(rewards[k:k + len(group)])
            k += len(group)
        return out

    res = sample_with_osla(prior_values, sample_round, n0=args.v05_n0, k_max=args.v05_kmax, cost=args.v05_cost,
                           pad=args.v05_pad, min_frac=args.v05_min_frac, fixed_k=args.v05_fixed)
    rates = torch.tensor([sum(r) / len(r) for r in res.rewards])
    metrics.update(osla_metrics(res))
    metrics.update(prior_metrics(prior_values, rates))
    metrics.update(algo.prior.last_head_params)
    for texts, rs in all_gather_objects(([p.problem for p in problems], rates)):  # every rank's prior sees all pairs
        algo.prior.update(texts, rs)
    return all_samples, [r for rs in res.rewards for r in rs], res, metrics


# ---------------------------------------------------------------------------------------------
# Data position, checkpoints


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


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in out.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.pt").is_file())
    return done[-1] if done else None


def save_checkpoint(out: Path, step: int, model, optimizer, tokenizer, stream: PromptStream, algo: Algorithm,
                    rank: int, keep: int, generated_total: int = 0) -> Path:
    """Atomic: everything is written into a temporary folder, which is then renamed into place.

    The folder loads directly with transformers / vLLM (`save_pretrained`); trainer_state.pt holds the
    optimizer, step, RNG states, data position and the algorithm's state; PPO's critic is in `critic/`.
    """
    weights = full_state_dict(model)  # all ranks gather
    optim_state = full_optimizer_state_dict(model, optimizer)
    algo_state = algo.state_dict()
    critic_weights = full_state_dict(algo.critic.model) if algo.critic is not None else None
    final = out / f"checkpoint-{step:06d}"
    if rank == 0:
        tmp = out / f".tmp-checkpoint-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict={k: v.cpu() for k, v in weights.items()})
        tokenizer.save_pretrained(tmp)
        if critic_weights is not None:  # loads with AutoModelForTokenClassification
            algo.critic.save_pretrained(tmp / "critic", critic_weights, tokenizer)
        torch.save({"step": step, "optimizer": optim_state, "stream": stream.state_dict(), "algorithm": algo_state,
                    "generated_tokens": generated_total,
                    "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}},
                   tmp / "trainer_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(out.glob("checkpoint-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


# ---------------------------------------------------------------------------------------------
# The loop


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    master = rank == 0
    out = Path(args.out)
    if master:
        out.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)

    try:
        train_problems = load_problems(args.data, "train", args.seed, args.problem_key, args.answer_key)
        eval_spec = args.eval_data or (args.data if args.data.startswith("arithmetic") else None)
        eval_problems = load_problems(eval_spec, "heldout", args.seed, args.problem_key, args.answer_key) if eval_spec else []
        base_model = resolve_model_path(args.model)
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    eval_problems = eval_problems[: args.eval_n]

    resume_from = latest_checkpoint(out) if args.resume else None
    if args.resume and resume_from is None and master:
        print(f"[resume] no checkpoint in {out}; starting from scratch", file=sys.stderr)
    model_path = str(resume_from) if resume_from else base_model

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    too_long = next(((p, n) for p in train_problems + eval_problems if (n := len(format_prompt(tokenizer, p))) > args.max_prompt_tokens), None)
    if too_long:
        sys.exit(f"error: problem {too_long[0].id!r} has a {too_long[1]}-token prompt, over --max-prompt-tokens {args.max_prompt_tokens}")
    model = load_actor(model_path, device, world)
    ref_model = load_actor(base_model, device, world).eval() if args.kl_coef > 0 else None
    optimizer = adamw(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    try:
        critic_path = str(resume_from / "critic") if resume_from and args.algo in CRITIC_ALGOS else (
            resolve_model_path(args.critic_model) if args.critic_model else base_model)
        algo = Algorithm(args, model.config, device, world, critic_path, tokenizer, sum(p.numel() for p in model.parameters()))
    except (FileNotFoundError, ImportError, ValueError) as e:  # e.g. a missing --prior-embedder
        sys.exit(f"error: {e}")
    stream = PromptStream(train_problems, args.seed)
    start_step, generated_total = 0, 0
    if resume_from:
        state = torch.load(resume_from / "trainer_state.pt", weights_only=False)
        load_full_optimizer_state_dict(model, optimizer, state["optimizer"])
        stream.load_state_dict(state["stream"])
        algo.load_state_dict(state["algorithm"])
        random.setstate(state["rng"]["python"]), np.random.set_state(state["rng"]["numpy"]), torch.set_rng_state(state["rng"]["torch"])
        start_step = state["step"]
        generated_total = state.get("generated_tokens", 0)
        if master:
            print(f"[resume] from {resume_from} at step {start_step}", file=sys.stderr)

    engine_kind = args.engine or default_engine()
    engine = make_engine(engine_kind, model_path, dtype=args.engine_dtype, seed=args.seed,
                         max_model_len=args.max_prompt_tokens + args.max_new_tokens,
                         gpu_memory_utilization=args.gpu_memory_utilization, world_size=world)
    verifier = MathVerifier(timeout_s=args.verifier_timeout) if any(p.kind == "math" for p in train_problems + eval_problems) else None
    marker = tokenizer.encode("</think>", add_special_tokens=False) if "</think>" in tokenizer.get_vocab() else None

    from eval import evaluate
    metrics_path = out / "metrics.jsonl"
    if master and not args.resume and metrics_path.exists():
        metrics_path.unlink()

    def log(record: dict) -> None:
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def run_eval(step: int) -> None:
        if not eval_problems or args.no_eval:
            return
        t = time.time()
        shard = eval_problems[rank::world]
        result = evaluate(engine, tokenizer, shard, args.eval_k, args.max_new_tokens, verifier, seed=args.seed + 17)
        totals = all_reduce(torch.tensor([result["correct_sum"], result["samples"], result["pass_at_k_sum"], result["problems"],
                                          result["generated_tokens"]], dtype=torch.float64))
        record = {"step": step, "eval/avg_at_k": float(totals[0] / totals[1]), "eval/pass_at_k": float(totals[2] / totals[3]),
                  "eval/k": args.eval_k, "eval/problems": int(totals[3]), "eval/generated_tokens": int(totals[4]),
                  "time/eval": time.time() - t}
        log(record)
        if master:
            print(f"[eval] step {step}: avg@{args.eval_k} {record['eval/avg_at_k']:.4f}  pass@{args.eval_k} "
                  f"{record['eval/pass_at_k']:.4f} on {record['eval/problems']} held-out problems ({record['time/eval']:.0f}s)", flush=True)

    if start_step == 0:
        run_eval(0)
    local_prompts = args.prompts_per_step // world
    if local_prompts < 1:
        sys.exit(f"error: --prompts-per-step {args.prompts_per_step} is smaller than the number of ranks {world}")

    warmup_steps = args.critic_warmup_steps  # VC-PPO: the first iterations train only the critic
    total_steps = warmup_steps + args.steps
    from tqdm import tqdm
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not master, desc=f"{args.algo}")
    for step in bar:
        t_step = time.time()
        warming_up = step < warmup_steps
        problems = stream.next_batch(local_prompts * world)[rank * local_prompts:(rank + 1) * local_prompts]
        prompt_ids = [format_prompt(tokenizer, p) for p in problems]

        # 1. generate + score
        t = time.time()
        engine.wake()
        samples, rewards, osla, m_gen = generate_rollouts(engine, algo, problems, prompt_ids, args,
                                                          seed=args.seed * 1_000_003 + step * 7 + rank, verifier=verifier)
        engine.sleep()
        t_generate = time.time() - t - m_gen["time/score"]
        batch = build_rollout_batch(prompt_ids, samples, rewards, pad_id)
        batch.extras["step"] = step

        # 2. old log-probs (+ entropy, + POISE features) from the trainer's own forward pass (the frozen actor
        #    of VC-PPO's warmup needs none)
        t = time.time()
        model.eval()
        if warming_up:
            batch.old_logprobs = batch.entropies = torch.zeros_like(batch.response_mask)
        else:
            compute_old_logprobs(model, batch, args, device, algo.probe_layer, marker)
        t_old = time.time() - t

        # 3. advantages (PPO / VC-PPO: critic values -> GAE)
        t = time.time()
        batch.advantages, m_algo = algo.advantages(batch, osla, problems)  # [N, R]
        t_adv = time.time() - t

        # 4. update the actor (not while VC-PPO pretrains its critic), then the critic on the same batch
        t = time.time()
        model.train()
        m_update = {} if warming_up else ppo_update(model, optimizer, batch, args, device, world, ref_model)
        t_update = time.time() - t
        if algo.critic is not None:
            t = time.time()
            m_algo.update(algo.critic.update(batch, args, device, world))
            m_algo["time/critic_update"] = time.time() - t

        # 5. sync the new weights into the engine
        t = time.time()
        if not warming_up:
            engine.wake()
            engine.load_weights(full_state_dict(model).items())
        t_sync = time.time() - t
        if warming_up and step + 1 == warmup_steps:  # the value-pretrained critic, for `eval.py values`
            from critic import save_critic_atomically
            save_critic_atomically(algo.critic, out / "critic-pretrained", tokenizer, rank)

        # 6. log
        mask = batch.response_mask
        seq_adv = (batch.advantages * mask).sum(1) / mask.sum(1).clamp(min=1)  # [N] mean advantage per rollout
        local = torch.tensor([float(batch.rewards.sum()), len(batch), float(mask.sum()), float(batch.attention_mask.sum()),
                              float((batch.entropies * mask).sum()), float((batch.old_logprobs - batch.engine_logprobs).abs().mul(mask).sum()),
                              float(seq_adv.sum()), float((seq_adv ** 2).sum()), float((seq_adv.abs() < 1e-8).sum()),
                              m_gen["score_timeouts"], m_gen["empty_responses"], m_gen["truncated"]], dtype=torch.float64)
        tot = all_reduce(local)
        n, tokens = float(tot[1]), max(float(tot[2]), 1.0)
        adv_mean = float(tot[6]) / n
        record = {
            "step": step + 1, "phase": "critic_warmup" if warming_up else "rl", "reward": float(tot[0]) / n, "response_length": tokens / n, "rollouts": int(n),
            "generated_tokens": int(tot[2]), "trained_tokens": int(tot[3]), "entropy": float(tot[4]) / tokens,
            "logprob_diff_engine_trainer": float(tot[5]) / tokens, "adv_mean": adv_mean,
            "adv_std": math.sqrt(max(float(tot[7]) / n - adv_mean ** 2, 0.0)), "zero_adv_frac": float(tot[8]) / n,
            "score_timeouts": int(tot[9]), "empty_responses": int(tot[10]), "truncated_frac": float(tot[11]) / n,
            **m_update, "time/generate": t_generate, "time/score": m_gen["time/score"], "time/old_logprob": t_old,
            "time/advantage": t_adv, "time/update": t_update, "time/sync": t_sync, "time/step": time.time() - t_step,
            **{k: v for k, v in m_gen.items() if k not in ("score_timeouts", "empty_responses", "truncated", "time/score")},
            **m_algo,
        }
        if warming_up:  # no trainer forward pass of the actor in this iteration
            del record["entropy"], record["logprob_diff_engine_trainer"]
        if "time/features" in batch.extras:  # POISE: feature pooling inside the old-log-prob pass
            record["time/features"] = batch.extras["time/features"]
        record["tokens_per_s/generate"] = record["generated_tokens"] / max(t_generate, 1e-9)
        record["tokens_per_s/train"] = record["trained_tokens"] / max(t_update, 1e-9)
        generated_total += record["generated_tokens"]
        record["generated_tokens_total"] = generated_total
        log(record)
        bar.set_postfix(reward=f"{record['reward']:.3f}", len=f"{record['response_length']:.0f}", s=f"{record['time/step']:.0f}")

        if args.token_budget and generated_total >= args.token_budget and step + 1 < total_steps:
            if master:
                print(f"[budget] {generated_total} generated tokens >= --token-budget {args.token_budget}; stopping after step {step + 1}", flush=True)
            total_steps = step + 1
            break
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total_steps:
            run_eval(step + 1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(out, step + 1, model, optimizer, tokenizer, stream, algo, rank, args.keep_checkpoints, generated_total)

    if start_step < total_steps:
        run_eval(total_steps)
        final = save_checkpoint(out, total_steps, model, optimizer, tokenizer, stream, algo, rank, args.keep_checkpoints, generated_total)
        if master:
            print(f"[done] {total_steps} steps; checkpoint {final}; metrics {metrics_path}; plots: python eval.py plot {out}", flush=True)
    if verifier is not None:
        verifier.close()
    engine.close()
    if args.algo == "genac":
        algo.critic.close()  # its own engine
    if dist.is_initialized():
        dist.barrier()  # no rank tears gloo down while another still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
