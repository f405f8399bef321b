"""The shared command-line flags of train.py (and the update flags of genac_stages.py / tools/speed.py), with their
checks.

Light on purpose (argparse and math only, no torch): train.py checks these flags before its heavy imports, so a
bad value stops in well under 2 s with one line naming it:

    $ python train.py --lr nan
    train.py: error: argument --lr: expected a finite number > 0, got 'nan'

An algorithm's own flags are added and checked after its module is imported (train.parse_args).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os

from trackers import TRACKERS

# Every algorithm, by its --algo name: the class that implements train.py's algorithm interface, as "module.Class".
# The ONE list (train.py, tools/sweep.py, the memory planner and the tests read it); adding an algorithm is a file + a
# line here. Names rather than classes, so that argument errors are reported before torch is imported (< 2 s).
ALGORITHMS = {
    "grpo": "advantage.GRPO",  # (r - mean) / (std + 1e-6) per prompt group; --no-std: Dr.GRPO
    "rloo": "advantage.RLOO",  # r_i - mean_{j != i} r_j
    "ppo": "critic.PPO",  # discriminative critic V_t, token-level GAE, batch-whitened
    "vcppo": "critic.VCPPO",  # PPO after value pretraining on the frozen actor
    "genac": "genac.GenAC",  # generative critic judges each segment's state in text, ICC hints
    "v05": "prior.V05",  # generalist value prior fused with sparse rollouts, OSLA extra rollouts
    "poise": "probe.POISE",  # hidden-state probe, cross-rollout baselines, 2 rollouts per prompt
}


def algorithm_class(name: str) -> type:
    """The class registered under `name` in ALGORITHMS (its module is imported now)."""
    module, cls = ALGORITHMS[name].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")  # verl's names (advantage.aggregate_loss)
MARGIN_GB = 8.0  # what the memory plan's chosen defaults leave free in every phase (memory.py)
ENGINE_MAX_NUM_SEQS, ENGINE_MAX_NUM_BATCHED_TOKENS = 256, 8192  # GPU defaults (vLLM's on >= 70 GB: 1024 / 16384)
PROMPTS_PER_STEP = 4  # --prompts-per-step's CPU-sized default (an algorithm may set its own: POISE 16)
SYNC_BUCKET_MB = 64  # per all-gather of the weight sync: bandwidth-bound on NVLink, < 0.1% of an 80 GB GPU


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse `type`: a finite int/float within [low, high] (low excluded when low_open), or a one-line error."""
    bounds = " and ".join(b for b in ((f"> {low:g}" if low_open else f">= {low:g}") if low is not None else "",
                                      f"<= {high:g}" if high is not None else "") if b)
    expected = f"expected {'an integer' if kind is int else 'a finite number'}" + (f" {bounds}" if bounds else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) or (
                high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value
    return parse


def algorithm_name(text: str) -> str:
    """An argparse `type` for --algo: one of ALGORITHMS, or a one-line error listing them."""
    if text not in ALGORITHMS:
        raise argparse.ArgumentTypeError(f"unknown --algo {text!r}; choose one of {', '.join(ALGORITHMS)}")
    return text


def add_run_arguments(parser) -> None:
    """train.py's flags shared by every algorithm."""
    a = parser.add_argument
    a("--algo", type=algorithm_name, default="grpo", help=f"one of {', '.join(ALGORITHMS)}")
    a("--model", default=None, help="HF causal LM folder or name (default: offline SmolLM2-135M-Instruct)")
    a("--data", default="arithmetic", help="'arithmetic[:levels]', a JSONL file, or a HF dataset name")
    a("--eval-data", default=None, help="held-out set (default: the held-out split of the arithmetic task)")
    a("--problem-key", default="problem", help="JSONL field holding the question")
    a("--answer-key", default="answer", help="JSONL field holding the reference answer")
    a("--out", default="runs/default", help="run folder: metrics.jsonl, checkpoints, plots")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    a("--seed", type=number(int), default=0)
    a("--steps", type=number(int, 0), default=30, help="RL iterations")
    a("--prompts-per-step", type=number(int, 1), default=PROMPTS_PER_STEP,
      help="prompts per iteration over all ranks (left unset: this default, or the algorithm's, rounded up to a "
           "multiple of the ranks)")
    a("--rollouts-per-prompt", type=number(int, 1), default=8,
      help="G (poise: 2; v05 samples --v05-n0 first, then OSLA)")
    a("--max-new-tokens", type=int, default=128)
    a("--max-prompt-tokens", type=number(int, 1), default=512, help="longer prompts are an error")
    a("--temperature", type=float, default=1.0)
    a("--top-p", type=float, default=1.0)
    add_update_arguments(parser)
    a("--engine", default=None, choices=("vllm", "hf"), help="generation engine (default: vllm if it imports)")
    a("--engine-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    a("--verifier-timeout", type=number(float, 0, low_open=True), default=5.0,
      help="seconds per math answer (timeouts score 0)")
    a("--eval-every", type=number(int, 0), default=0, help="evaluate every N steps (0: only before and after training)")
    a("--eval-n", type=number(int, 0), default=200, help="held-out problems per evaluation")
    a("--eval-k", type=int, default=4, help="samples per problem (avg@k, pass@k)")
    a("--no-eval", action="store_true", help="skip the evaluations before and after training")
    a("--token-budget", type=number(int, 0), default=0,
      help="stop after this many generated tokens (0: none): equal-cost comparisons")
    a("--save-every", type=number(int, 0), default=0, help="checkpoint every N steps (0: only at the end)")
    a("--keep-checkpoints", type=number(int, 1), default=2)
    add_engine_arguments(parser)
    a("--gpu-gb", type=number(float, 0, low_open=True), default=None,
      help="each GPU's capacity for the memory plan (default: the device's, torch.cuda.mem_get_info; on the CPU "
           "unset: the plan is printed, not checked)")
    a("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
      help="default: from the plan on a GPU")
    a("--dist-timeout", type=number(float, 0, low_open=True), default=3600.0,
      help="seconds a collective may wait (uneven judge phases, rank 0's export)")
    a("--report-to", nargs="+", default=["none"], choices=("none", *TRACKERS),
      help="also log every metrics.jsonl record to these trackers (offline by default; docs/trackers.md)")


def add_engine_arguments(parser) -> None:
    """The generation engine's memory and batch limits (train.py; eval.py memory plans with the same flags)."""
    a = parser.add_argument
    a("--gpu-memory-utilization", type=number(float, 0, 1, low_open=True), default=None,
      help="the engine's share of the GPU (vLLM's budget; GenAC's critic is served by the same engine). Default: "
           "from the plan on a GPU, 0.3 on the CPU")
    a("--engine-max-num-seqs", type=number(int, 1), default=None,
      help=f"vLLM max_num_seqs (default: {ENGINE_MAX_NUM_SEQS} on a GPU, vLLM's on the CPU)")
    a("--engine-max-num-batched-tokens", type=number(int, 1), default=None,
      help=f"vLLM max_num_batched_tokens (default: {ENGINE_MAX_NUM_BATCHED_TOKENS} on a GPU, vLLM's on the CPU)")
    a("--margin-gb", type=number(float, 0), default=MARGIN_GB,
      help="GB the defaults chosen from the plan leave free in every phase")


def add_update_arguments(parser) -> None:
    """The update's flags, shared by train.py and genac.py's stage commands (defaults: GenAC Table 5,
    arXiv:2604.10701, except the CPU-sized lr)."""
    a = parser.add_argument
    a("--lr", type=number(float, 0, low_open=True), default=2e-5,
      help="actor lr (papers: 1e-6 for 1.5-8B models; the 135M CPU default uses more)")
    a("--weight-decay", type=number(float, 0), default=0.01)
    a("--grad-clip", type=number(float, 0, low_open=True), default=1.0)
    a("--clip-low", type=number(float, 0, 1, low_open=True), default=0.2)
    a("--clip-high", type=number(float, 0, low_open=True), default=0.2, help="0.28 = DAPO clip-higher")
    a("--clip-ratio-c", type=number(float, 1, low_open=True), default=3.0,
      help="dual-clip bound on negative advantages (verl's default)")
    a("--loss-agg", default="token-mean", choices=LOSS_AGG_MODES)
    a("--kl-coef", type=number(float, 0), default=0.0, help="k3 KL to the initial model (0: no reference model loaded)")
    a("--ppo-epochs", type=int, default=1)
    a("--mini-batches", type=int, default=2, help="optimizer steps per epoch (verl: batch / ppo_mini_batch_size)")
    a("--micro-batch-size", type=int, default=16, help="rollouts per forward/backward")
    a("--no-share-prompts", dest="share_prompts", action="store_false", help="run every rollout's prompt in the "
      "trainer's forward passes (default: a prompt once per micro-batch for all its rollouts; same log-probs)")
    a("--dtype", default="bf16", choices=("bf16", "fp32"), help="training compute dtype (master weights fp32): "
      "autocast; on GPU under FSDP2 also bf16 parameters in forward/backward with fp32 gradient reduction "
      "(MixedPrecisionPolicy)")
    a("--gradient-checkpointing", action="store_true", help="recompute each decoder layer's activations in the "
      "backward (memory for time: long responses on big models)")
    a("--sync-bucket-mb", type=number(float, 0), default=SYNC_BUCKET_MB, help="weight sync: parameters gathered per "
      "all-gather, in MB of the engine's dtype; a rank holds one such bucket of full tensors beyond its shard "
      "(0: one parameter at a time)")


def world_size() -> int:
    """torchrun's WORLD_SIZE (plain python: 1): the prompts of a step are split evenly over the ranks."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def flag_given(argv: list[str], flag: str) -> bool:
    """Whether `flag` is on the command line (`--flag V` or `--flag=V`; abbreviations are off in train.py)."""
    return any(token == flag or token.startswith(flag + "=") for token in argv)


def follow_world_size(args, argv: list[str], world: int) -> str | None:
    """A --prompts-per-step left unset (this file's default or the algorithm's) is rounded up to a multiple of the
    `world` ranks, so the design card's `torchrun --nproc_per_node=8 train.py --algo genac` starts as written; a
    value the user gave is kept, and run_argument_error checks it. -> the line to print, or None."""
    default = args.prompts_per_step
    if flag_given(argv, "--prompts-per-step") or default % world == 0:
        return None
    args.prompts_per_step = -(-default // world) * world
    return f"[world] --prompts-per-step {args.prompts_per_step}: the default {default} rounded up to the {world} ranks"


def run_argument_error(args, world: int | None = None) -> str | None:
    """The first shared flag (or combination) that cannot work, as a one-line message; None when all can (after
    follow_world_size has rounded an unset --prompts-per-step)."""
    world = world_size() if world is None else world
    prompts = args.prompts_per_step
    for message, ok in (("--max-new-tokens must be >= 1", args.max_new_tokens >= 1),
                        ("--temperature must be > 0", math.isfinite(args.temperature) and args.temperature > 0),
                        ("--top-p must be in (0, 1]", 0 < args.top_p <= 1),
                        ("--eval-k must be >= 1", args.eval_k >= 1),
                        ("--micro-batch-size, --mini-batches and --ppo-epochs must be >= 1",
                         min(args.micro_batch_size or 1, args.mini_batches, args.ppo_epochs) >= 1),
                        (f"--prompts-per-step {prompts} must be a multiple of the {world} ranks (WORLD_SIZE); "
                         f"use {-(-prompts // world) * world}, or leave it unset",
                         prompts % world == 0)):
        if not ok:
            return message
    return None


def check_run_arguments_early(argv: list[str], prog: str) -> None:
    """The shared flags alone (an algorithm's own are left for later), checked before any heavy import:
    a bad value exits with status 2 and one line (no usage block)."""
    parser = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False, exit_on_error=False)
    add_run_arguments(parser)  # abbreviated flags are refused by the full parse
    try:
        args = parser.parse_known_args(argv)[0]
        follow_world_size(args, argv, world_size())  # an algorithm's own default is rounded in the full parse
        message = run_argument_error(args)
    except argparse.ArgumentError as e:
        message = str(e)
    if message is not None:
        parser.exit(2, f"{prog}: error: {message}\n")
