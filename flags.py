"""The shared command-line flags of train.py (and the update flags of genac_stages.py / tools/speed.py), with their
checks; the list of algorithms (ALGORITHMS); the parser that adds the chosen algorithm's own flags (algo_flags.py);
the start checks of the models a flag names.

Light on purpose (argparse and math only, no torch): train.py checks these flags before its heavy imports, so a
bad value stops in well under 2 s with one line naming it:

    $ python train.py --lr nan
    train.py: error: argument --lr: expected a finite number > 0, got 'nan'

Every error is one line (`OneLineParser`, no usage block); an algorithm's own flags are parsed from its torch-free
flags class (algo_flags.py, which the algorithm class inherits) without importing the algorithm, and a flag of
another algorithm says whose it is:

    $ python train.py --algo grpo --critic-warmup-steps 3
    train.py: error: unrecognized arguments: --critic-warmup-steps 3 (--critic-warmup-steps is a flag of --algo
    ppo, vcppo; `python train.py --algo grpo --help` lists this run's flags)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from pathlib import Path

from algo_flags import ALGORITHM_FLAGS, number
from trackers import TRACKERS, install_line, missing_packages

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


def algorithm_flags(name: str) -> type:
    """The class holding algorithm `name`'s flags: its torch-free entry of ALGORITHM_FLAGS, else the algorithm class
    itself (its module imported: torch included, so its flag errors take seconds)."""
    return ALGORITHM_FLAGS.get(name) or algorithm_class(name)


LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")  # verl's names (advantage.aggregate_loss)
MARGIN_GB = 8.0  # what the memory plan's chosen defaults leave free in every phase (memory.py)
ENGINE_MAX_NUM_SEQS, ENGINE_MAX_NUM_BATCHED_TOKENS = 256, 8192  # GPU defaults (vLLM's on >= 70 GB: 1024 / 16384)
PROMPTS_PER_STEP = 4  # --prompts-per-step's CPU-sized default (an algorithm may set its own: POISE 16)
SYNC_BUCKET_MB = 64  # per all-gather of the weight sync: bandwidth-bound on NVLink, < 0.1% of an 80 GB GPU


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
    a("--ppo-epochs", type=number(int, 1), default=1)
    a("--mini-batches", type=number(int, 1), default=2,
      help="optimizer steps per epoch (verl: batch / ppo_mini_batch_size)")
    a("--micro-batch-size", type=number(int, 1), default=16, help="rollouts per forward/backward")
    a("--share-prompts", action=argparse.BooleanOptionalAction, default=True, help="run a prompt once per "
      "micro-batch for all its rollouts (same log-probs; packing.pack_shared_prompts); --no-share-prompts: every "
      "rollout's prompt in the trainer's forward passes. train.py's default: on the CPU, off on a GPU "
      "(memory.share_prompts_default)")
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
                        ("--micro-batch-size, --mini-batches and --ppo-epochs must be >= 1",  # None: planned
                         min(1 if args.micro_batch_size is None else args.micro_batch_size, args.mini_batches,
                             args.ppo_epochs) >= 1),
                        (f"--prompts-per-step {prompts} must be a multiple of the {world} ranks (WORLD_SIZE); "
                         f"use {-(-prompts // world) * world}, or leave it unset",
                         prompts % world == 0)):
        if not ok:
            return message
    return None


# ---------------------------------------------------------------------------------------------
# Parsing: one line per error, an algorithm's own flags without importing it


class OneLineParser(argparse.ArgumentParser):
    """argparse with every error as ONE line, `prog: error: message`, status 2: no usage block above the line that
    matters (`-h` shows the usage). An unknown flag that belongs to another algorithm says which (`algo`: the run's)."""

    algo: str | None = None

    def error(self, message: str):
        if message.startswith("unrecognized arguments:") and self.algo is not None:
            message += flag_owner_hint(message, self.algo, self.prog)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_train_args(argv: list[str], prog: str = "train.py", description: str | None = None) -> argparse.Namespace:
    """train.py's command line: the shared flags, then the chosen algorithm's own (from its torch-free flags class,
    `algorithm_flags`), each checked. Imports nothing heavy; a bad flag exits with status 2 and one line. An unset
    --prompts-per-step follows the world size (`follow_world_size`, printed)."""
    p = OneLineParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                      add_help=False, allow_abbrev=False)
    add_run_arguments(p)  # the shared flags with their types and ranges
    # None: chosen from the memory plan for the target device (memory.run_plan)
    p.set_defaults(micro_batch_size=None, gradient_checkpointing=None, share_prompts=None)
    p.algo = algo = p.parse_known_args(argv)[0].algo  # a key of ALGORITHMS (checked by algorithm_name)
    flags = algorithm_flags(algo)
    flags.add_arguments(p.add_argument_group(f"--algo {algo}"))
    p.add_argument("-h", "--help", action="help", help="show this help (with --algo X: its flags too) and exit")
    args = p.parse_args(argv)
    world_line = follow_world_size(args, argv, world_size())  # an unset --prompts-per-step follows WORLD_SIZE
    if world_line and os.environ.get("RANK", "0") == "0":
        print(world_line, file=sys.stderr, flush=True)
    if (message := run_argument_error(args)) is not None:
        p.error(message)
    if missing := missing_packages(t for t in args.report_to if t != "none"):
        p.error(f"--report-to {' '.join(missing)} needs its package: {install_line(missing)}")
    try:
        flags.check_arguments(args)
    except ValueError as e:
        p.error(str(e))
    return args


def check_run_arguments_early(argv: list[str], prog: str) -> None:
    """Every flag of train.py checked without importing torch (parse_train_args): a bad value exits with status 2
    and one line (no usage block)."""
    parse_train_args(argv, prog)


class _FlagNames:
    """A stand-in parser that only collects the option strings an add_arguments declares."""

    def __init__(self):
        self.names: set[str] = set()

    def add_argument(self, *names, **_) -> None:
        self.names.update(names)

    def set_defaults(self, **_) -> None:
        pass


def flag_owner_hint(message: str, algo: str, prog: str) -> str:
    """For "unrecognized arguments: --x 3": which algorithms own --x (those with a torch-free flags class: the hint
    imports no algorithm module), and the command that lists this run's flags."""
    owners = {}
    for name in [a for a in ALGORITHMS if a in ALGORITHM_FLAGS]:
        declared = _FlagNames()
        ALGORITHM_FLAGS[name].add_arguments(declared)
        for flag in declared.names:
            owners.setdefault(flag, []).append(name)
    unknown = [t.split("=")[0] for t in message.split(":", 1)[1].split() if t.startswith("--")]
    known = [(flag, owners[flag]) for flag in unknown if flag in owners]
    where = "; ".join(f"{flag} is a flag of --algo {', '.join(names)}" for flag, names in known)
    return f" ({where + '; ' if where else ''}`python {prog} --algo {algo} --help` lists this run's flags)"


# ---------------------------------------------------------------------------------------------
# Models named by a flag, checked without loading anything


def model_error(flag: str, value: str | None, hub_names: bool = True) -> str | None:
    """Why `value`, given to `flag`, is no model folder a run can load, told from the filesystem alone: a path to
    nothing, a file, a folder without config.json, a sharded train.py checkpoint without Hugging Face weights.
    None when it may be one: a folder, None (the offline default), or with `hub_names` an "org/name" (resolved
    when it loads)."""
    if not value:
        return None
    path = Path(value).expanduser() if not hub_names else Path(value)
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"{flag} {value}: the folder has no config.json (not a Hugging Face model folder)"
        if (path / "sharded" / ".metadata").is_file() and not any(path.glob("*.safetensors")):
            return (f"{flag} {value}: a sharded train.py checkpoint without Hugging Face weights; write them with "
                    f"`python eval.py export {value}` (in place)")
        return None
    if path.exists():
        return f"{flag} {value}: a file, not a model folder"
    local = value.startswith(("/", ".", "~")) or value.count("/") != 1 or path.parent.is_dir()  # not "org/name"
    if not hub_names or local:
        return f"{flag} {value}: no such folder; give a Hugging Face model folder"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") and not _in_hub_cache(value):
        return (f"{flag} {value}: no such folder, and not in the Hugging Face cache (HF_HUB_OFFLINE is set); give a "
                "model folder, or download it first")
    return None


def _in_hub_cache(name: str) -> bool:
    """Whether the hub model `name` has a config.json in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return True  # cannot tell: left to the loading
    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def context_error(model_dir: str | None, args) -> str | None:
    """--max-prompt-tokens + --max-new-tokens over the positions of the model folder (config.json's
    max_position_embeddings): the engine could not hold a prompt and its response. None when they fit or unknown."""
    config = Path(model_dir or "") / "config.json"
    if not model_dir or not config.is_file():
        return None
    try:
        limit = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    need = args.max_prompt_tokens + args.max_new_tokens
    if isinstance(limit, int) and need > limit:
        return (f"--max-prompt-tokens {args.max_prompt_tokens} + --max-new-tokens {args.max_new_tokens} = {need} "
                f"tokens, over the {limit} positions of {model_dir} (max_position_embeddings); lower them")
    return None


def fill_planned_flags(args, planned: dict) -> None:
    """The last step of parsing train.py's flags, before anything reads them: the flags left unset (None), as the memory
    plan chose them for this device and world (memory.run_plan: micro-batch, checkpointing, shared prompts, the
    engine's share and batch limits). Nothing writes to `args` after this."""
    for dest, value in planned.items():
        setattr(args, dest, value)
