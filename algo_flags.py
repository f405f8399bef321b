"""Each algorithm's own command-line flags (`GRPOFlags` ... `POISEFlags`, registered by --algo name in
ALGORITHM_FLAGS), with their checks, and `number`, the argparse type of these and of the shared flags (flags.py).

Torch-free on purpose (argparse and math only): train.py parses and checks the chosen algorithm's flags before its
heavy imports, so a bad flag stops in well under 2 s with one line naming it:

    $ python train.py --algo ppo --gamma 2
    train.py: error: argument --gamma: expected a finite number >= 0 and <= 1, got '2'

Each algorithm class inherits its flags class (`class GRPO(GRPOFlags)` in advantage.py), so `GRPO.add_arguments` is
the same function whether train.py parses the command line (no torch yet) or a tool calls it. A new algorithm copies
GRPOFlags and adds a line to ALGORITHM_FLAGS (README, "Add an algorithm"). The shared flags, the parser that adds
these to them and the list of algorithms (ALGORITHMS) are in flags.py, which imports this module (this one imports
none of ours, hence `number` here: no import circle).
"""

from __future__ import annotations

import argparse
import math


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


class AlgorithmFlags:
    """No flags of its own. The attributes say what else a start checks before anything is loaded or written."""

    model_flags: tuple[str, ...] = ()  # dests of flags that name a model: a folder or a hub name (model_error)
    folder_flags: tuple[str, ...] = ()  # dests of flags that name a local model folder
    resume_fixed: tuple[str, ...] = ()  # dests a --resume must keep: the checkpoint's state depends on them
    checkpoint_files: tuple[str, ...] = ()  # files every checkpoint of this algorithm holds (checked on --resume)

    @staticmethod
    def add_arguments(parser) -> None:
        """Its own flags, and its defaults for shared ones (parser.set_defaults)."""

    @staticmethod
    def check_arguments(args) -> None:
        """Raise ValueError naming a bad flag (one line); may fill defaults that depend on other flags."""


class GRPOFlags(AlgorithmFlags):
    """advantage.GRPO: --no-std is Dr.GRPO; a group baseline needs G >= 2."""

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("--no-std", action="store_true", help="no std normalisation (Dr.GRPO)")

    @staticmethod
    def check_arguments(args) -> None:
        if args.rollouts_per_prompt < 2:
            raise ValueError(f"--rollouts-per-prompt must be >= 2 for a group baseline, got "
                             f"{args.rollouts_per_prompt}; use 2 or more (default 8)")


class RLOOFlags(GRPOFlags):
    """advantage.RLOO: GRPO's check (a leave-one-out mean needs a sibling), no flags of its own."""

    @staticmethod
    def add_arguments(parser) -> None:
        pass


class PPOFlags(AlgorithmFlags):
    """critic.PPO: the critic's model, lr, GAE and value clip; any G >= 1 works (the critic is the baseline)."""

    model_flags = resume_fixed = ("critic_model",)
    checkpoint_files = ("critic/sharded/.metadata",)

    @staticmethod
    def add_arguments(parser) -> None:
        a = parser.add_argument
        a("--critic-model", "--critic", default=None, help="critic to start from (default: the actor's base model, "
          "its LM head replaced by a fresh scalar head)")
        a("--critic-lr", type=number(float, 0, low_open=True), default=5e-6)
        a("--gamma", type=number(float, 0, 1), default=1.0, help="GAE discount")
        a("--lam", type=number(float, 0, 1), default=1.0, help="GAE lambda of the actor's advantages")
        a("--critic-lam", type=number(float, 0, 1), default=None,
          help="GAE lambda of the critic's returns (default: --lam; VC-PPO: 1)")
        a("--value-clip", type=number(float, 0, low_open=True), default=0.5)
        a("--critic-warmup-steps", type=number(int, 0), default=0, help="critic-only iterations on the frozen actor "
          "before RL (value pretraining; VC-PPO: 6)")


class VCPPOFlags(PPOFlags):
    """critic.VCPPO: PPO's flags with the paper's defaults (value pretraining, decoupled GAE)."""

    @staticmethod
    def add_arguments(parser) -> None:
        PPOFlags.add_arguments(parser)
        parser.set_defaults(critic_warmup_steps=6, critic_lam=1.0, lam=0.95)  # decoupled GAE as the paper sets it


class GenACFlags(AlgorithmFlags):
    """genac.GenAC (and genac_stages.py): the generative critic, its segments, ICC hints, guided answers; the
    defaults that follow --model (PROFILES)."""

    model_flags = resume_fixed = ("critic_model",)
    checkpoint_files = ("critic/sharded/.metadata",)
    # the defaults that follow --model (check_arguments): the offline default model's, the paper's (App. C, Table 5)
    PROFILE_FIELDS = ("segment_tokens", "max_segments", "critic_max_new_tokens", "critic_guided")
    PROFILES = {"cpu": (32, 8, 128, True), "paper": (120, None, 1024, False)}

    @staticmethod
    def add_arguments(parser) -> None:
        a = parser.add_argument
        a("--critic-model", "--critic", default=None,
          help="critic to start from: a genac_stages.py folder (default: the actor)")
        a("--critic-lr", type=number(float, 0, low_open=True), default=1e-6, help="[Table 5]")
        a("--gamma", type=number(float, 0, 1), default=1.0, help="GAE discount")
        a("--lam", type=number(float, 0, 1), default=1.0, help="GAE lambda")
        a("--segment-tokens", type=int, default=None,
          help="segment length L1 (default: 120 as App. C; offline default model: 32)")
        a("--max-segments", type=int, default=None,
          help="segments per response at most; 0: no cap (default: none; offline default: 8)")
        a("--critic-max-new-tokens", type=int, default=None,
          help="critic reasoning budget (default: 1024, Table 5; offline default: 128)")
        a("--critic-max-prompt-tokens", type=int, default=None,
          help="default: the actor's --max-prompt-tokens + --max-new-tokens + "
          "the ICC template; a smaller value cuts prompts from the left, counted in genac/critic_prompts_cut")
        a("--critic-temperature", type=number(float, 0, low_open=True), default=1.0)
        a("--critic-mini-batches", type=int, default=1,
          help="optimizer steps of the critic per iteration (1: one REINFORCE step)")
        a("--icc-momentum", type=number(float, 0, 1), default=0.999, help="c in tau <- c tau + (1 - c) r, per sample")
        a("--icc-carry-over", action="store_true",
          help="take tau from the --critic folder (default: tau_0 = 0, Alg. 1 l. 1; "
          "resuming a train.py checkpoint always restores it)")
        a("--no-icc", action="store_true",
          help="drop the ICC hints (actor size, success rate): the paper's Table 2 ablation")
        a("--critic-baseline", default="mean", choices=("mean", "none"), help="REINFORCE baseline of the critic update")
        a("--no-pack-critic-states", dest="pack_critic_states", action="store_false", help="train the critic on one "
          "row per state (default: the states of one response in one row, their shared prefix once; the same "
          "log-probs and gradients)")
        a("--critic-guided", action=argparse.BooleanOptionalAction, default=None,
          help="constrain the critic's answers to '<reasoning> \\boxed{0..10}' with the engine's guided decoding "
          "(vLLM); the update still uses the model's unconstrained log-probs. Default: on for the offline default "
          "model (its untrained critic never boxes a score), off (the paper's free answers) for any --model")

    @staticmethod
    def check_arguments(args) -> None:
        """Raises ValueError naming a bad flag, and FILLS the defaults that depend on --model: --segment-tokens,
        --max-segments, --critic-max-new-tokens, --critic-guided left None take the 'cpu' profile (32, 8, 128, guided
        answers) when args.model is None (the offline default model; call before it is resolved), else the 'paper'
        one (120, no cap, 1024, free answers; App. C, Table 5); args.genac_profile names it. Guided answers need
        vLLM: --engine hf keeps free ones. --max-segments 0 -> None (no cap). Any G >= 1 works."""
        args.genac_profile = "cpu" if args.model is None else "paper"
        profile = dict(zip(GenACFlags.PROFILE_FIELDS, GenACFlags.PROFILES[args.genac_profile]))
        profile["critic_guided"] = profile["critic_guided"] and getattr(args, "engine", None) != "hf"
        for name, value in profile.items():
            setattr(args, name, value if getattr(args, name, None) is None else getattr(args, name))
        for name, low in (("segment_tokens", 1), ("max_segments", 0), ("critic_max_new_tokens", 1),
                          ("critic_mini_batches", 1), ("critic_max_prompt_tokens", 1)):
            if getattr(args, name) is not None and getattr(args, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}")
        args.max_segments = args.max_segments or None


def effective_k_max(cost: float, k_max: int | None = None) -> int:
    """V0.5's K_max = floor(1/sqrt(c)) (App. A.6) unless k_max is given: the one place it is derived."""
    if cost <= 0:
        raise ValueError(f"the OSLA cost c (--v05-cost) must be > 0, got {cost}")
    return math.floor(1 / math.sqrt(cost)) if k_max is None else k_max


class V05Flags(AlgorithmFlags):
    """prior.V05: first-round rollouts, OSLA's cost and cap, the prior's embedder."""

    folder_flags = resume_fixed = ("prior_embedder",)

    @staticmethod
    def add_arguments(parser) -> None:
        a = parser.add_argument
        a("--v05-n0", type=number(int, 1), default=4, help="first-round rollouts per prompt (App. A.8)")
        a("--v05-kmax", type=number(int, 1), default=None,
          help="rollout cap K_max (default: floor(1/sqrt(--v05-cost)))")
        a("--v05-cost", type=number(float, 0, 1, low_open=True), default=0.0039,
          help="OSLA marginal cost c per rollout")
        a("--v05-pad", type=number(int, 1), default=4, help="extra rollouts are rounded up to a multiple of this")
        a("--v05-min-frac", type=number(float, 0, 1), default=0.1,
          help="stop when fewer prompts than this share want more")
        a("--v05-fixed", type=number(int, 1), default=None,
          help="static ablation: fuse with exactly K rollouts, no OSLA")
        a("--v05-std", default="bernoulli", choices=("bernoulli", "none"))
        a("--prior-embedder", default=None, help="embedding model folder for the prior (default: all-MiniLM-L6-v2)")
        a("--prior-pooling", default="mean", choices=("mean", "last"), help="'last' for Qwen3-Embedding-style models")

    @staticmethod
    def k_max(args) -> int:
        return effective_k_max(args.v05_cost, args.v05_kmax)  # K_max of a run

    @staticmethod
    def check_arguments(args) -> None:
        flag, first = ("--v05-fixed", args.v05_fixed) if args.v05_fixed else ("--v05-n0", args.v05_n0)
        if first > V05Flags.k_max(args):
            raise ValueError(f"{flag} {first} is over K_max {V05Flags.k_max(args)} (--v05-kmax, else "
                             f"floor(1/sqrt(--v05-cost {args.v05_cost:g}))); lower {flag} or raise --v05-kmax")


class POISEFlags(AlgorithmFlags):
    """probe.POISE: the probe's layer and buffer, the authors' defaults for shared flags; G >= 2."""

    resume_fixed = ("probe_layer", "probe_standardize_hidden")  # the fitted probe reads these features

    @staticmethod
    def add_arguments(parser) -> None:
        a = parser.add_argument
        a("--probe-layer", type=number(int, 0), default=None, help="decoder layer for features (default 0.55 x depth)")
        a("--probe-bootstrap-steps", type=number(int, 0), default=16, help="RLOO steps that fill the probe's buffer")
        a("--probe-standardize-hidden", action="store_true", help="scale hidden dims before PCA (default: centre only)")
        # G = 2 at GRPO's rollout budget; as the authors' launcher: clip-higher 0.28 (clip_ratio_high), dual-clip
        # c = 10 (clip_ratio_c) and 8 optimizer steps per iteration (train batch / ppo_mini_batch_size)
        parser.set_defaults(rollouts_per_prompt=2, prompts_per_step=16, clip_high=0.28, clip_ratio_c=10.0,
                            mini_batches=8)

    @staticmethod
    def check_arguments(args) -> None:
        if args.rollouts_per_prompt < 2:
            raise ValueError(f"--rollouts-per-prompt must be >= 2: POISE's baselines average the siblings, got "
                             f"{args.rollouts_per_prompt}")




# --algo name -> its flags class (the algorithm class in flags.ALGORITHMS inherits it; tests/test_bad_start.py checks)
ALGORITHM_FLAGS = {"grpo": GRPOFlags, "rloo": RLOOFlags, "ppo": PPOFlags, "vcppo": VCPPOFlags,
                   "genac": GenACFlags, "v05": V05Flags, "poise": POISEFlags}
