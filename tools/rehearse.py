"""The GPU trainer rehearsed on the CPU: the project's own loading, update and sync code run at the GPU run's sizes on
fake tensors, each phase measured by PyTorch's FSDPMemTracker and set beside the memory plan (memory.py).

    python eval.py memory --rehearse --model CONFIG --algo genac --world 8 --gpu-gb 80

No GPU is needed and no weight is read: CONFIG is a config.json or model folder. What runs, per algorithm:
  load            actor.load_actor at world W: meta build, fully_shard, to_empty, rank 0's broadcast (this process
                  is rank 1 of a fake process group of W ranks: torch.testing._internal.distributed.fake_pg)
  actor update    update.ppo_update at the plan's micro-batch, checkpointing and shared-prompt choice: one optimizer
                  step of two micro-batches (the first's gradients held at the second's peak), run twice (AdamW's
                  states resident at the second run's peak)
  old log-probs   actor.old_logprob_passes with POISE's hidden-state pooling (poise only)
  critic update   critic.PPO.after_update (ppo, vcppo); GenAC's packed critic update through update.ppo_update on
                  its critic states (genac)
  sync            actor.stream_full_parameters to the end, in the engine's bf16
How: every tensor of a million elements or more, and everything computed from one, is a FakeTensor (shape, dtype,
no storage: torch._subclasses.fake_tensor); the small bookkeeping tensors (lengths, indices, layouts) stay real,
so the code's data-dependent control flow runs as written (`FakeLargeTensors`). A fake scalar read (`.item()`,
`float(loss)`) answers 0: the rehearsal measures bytes, not values. Tensors sit on a CPU device mesh; every
device-dependent choice is made for the target, CUDA (actor.mixed_precision_policy, memory.share_prompts_default).
What only a GPU settles: vLLM's profiling peak and CUDA graphs, the caching allocator's fragmentation, NCCL's
buffers, the CUDA context, which attention kernel runs and its workspace, speed (docs/memory.md).
"""

from __future__ import annotations

import functools
import os
import sys

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GB = 1e9
FAKE_FROM_ELEMENTS = 2 ** 20  # a new tensor this large (or larger) is fake: model, activation or FSDP2 buffer size
aten = torch.ops.aten


class FakeLargeTensors(TorchDispatchMode):
    """Routes each op: to a FakeTensorMode when an input is fake or it creates a tensor of >= FAKE_FROM_ELEMENTS
    elements, else to the real kernel. A fake scalar read answers 0 (of its dtype)."""

    def __init__(self):
        super().__init__()
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        if any(isinstance(t, FakeTensor) for t in leaves):
            if func is aten._local_scalar_dense.default:
                return False if args[0].dtype == torch.bool else 0.0 if args[0].is_floating_point() else 0
            with self.fake:
                return func(*args, **kwargs)
        if torch.Tag.nondeterministic_seeded not in func.tags and _creates_large(func, args, kwargs):
            with self.fake:
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _creates_large(func, args, kwargs) -> bool:
    """A factory (empty, zeros, full, *_like, new_*) whose result has >= FAKE_FROM_ELEMENTS elements."""
    name = func.__name__.split(".")[0]
    if name in ("empty", "zeros", "ones", "full", "empty_strided", "randn", "rand"):
        size = args[0] if args else kwargs.get("size", ())
        return _numel(size) >= FAKE_FROM_ELEMENTS
    if name in ("empty_like", "zeros_like", "ones_like", "full_like", "randn_like", "rand_like"):
        return args[0].numel() >= FAKE_FROM_ELEMENTS
    if name in ("new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided"):
        return _numel(args[1]) >= FAKE_FROM_ELEMENTS
    return False


def _numel(size) -> int:
    n = 1
    for d in (size if isinstance(size, (list, tuple, torch.Size)) else [size]):
        n *= int(d)
    return n


def fake_process_group(world: int, rank: int = 0) -> None:
    """A process group of `world` ranks whose collectives return at once; this process is `rank` 0, the one that
    reads the checkpoint and broadcasts it (the rehearsal answers the read from the config: weights_from_config)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def weights_from_config(model_class, model_path: str, config) -> dict:
    """actor.read_full_state_dict's answer in a rehearsal: the model built from its config (large tensors fake)."""
    return model_class.from_config(config, dtype=torch.float32).state_dict()


def synthetic_batch(prompts: int, rollouts: int, prompt_tokens: int, response_tokens: int, vocab: int,
                    prompt_lens: list[int] | None = None, answer_tokens: int | None = None):
    """A RolloutBatch of `prompts` x `rollouts` full-length rows [prompt_tokens | response_tokens], random token
    ids (values do not matter to the bytes), all rollouts of a prompt in one group."""
    from rollout import RolloutBatch
    g = torch.Generator().manual_seed(0)
    N, P, R = prompts * rollouts, prompt_tokens, response_tokens
    ids = torch.randint(0, vocab, (N, P + R), generator=g)
    lens = torch.tensor(prompt_lens if prompt_lens is not None else [P] * N)
    attention = (torch.arange(P + R)[None, :] >= (P - lens)[:, None]).long()
    return RolloutBatch(ids, attention, torch.ones(N, R), lens, torch.full((N,), R), torch.zeros(N, R),
                        torch.zeros(N), torch.arange(prompts).repeat_interleave(rollouts), P)


def genac_critic_batch(prompt_tokens: int, response_tokens: int, segment_tokens: int, template_tokens: int,
                       answer_tokens: int, responses: int, vocab: int):
    """GenAC's critic states of `responses` full-length responses (Eq. 4, arXiv:2604.10701): state k reads the ICC
    template, the problem and y_<b_k (b_k = k x segment_tokens), then answers `answer_tokens` tokens. The states of
    one response share their prefix exactly (GenAC.prompt_parts builds them from tokens), so they are one group."""
    from rollout import RolloutBatch
    states = -(-response_tokens // segment_tokens)
    head = prompt_tokens + template_tokens // 2  # template head + problem: the part every state shares
    closing = template_tokens - template_tokens // 2
    g = torch.Generator().manual_seed(0)
    rows, lens = [], []
    width = head + response_tokens + closing
    for _ in range(responses):
        shared = torch.randint(0, vocab, (head + response_tokens,), generator=g)
        tail = torch.randint(0, vocab, (closing,), generator=g)
        for k in range(states):
            prompt = torch.cat([shared[:head + k * segment_tokens], tail])
            rows.append(torch.cat([torch.zeros(width - len(prompt), dtype=torch.long), prompt]))
            lens.append(len(prompt))
    N, R = len(rows), answer_tokens
    prompt_ids = torch.stack(rows)
    ids = torch.cat([prompt_ids, torch.randint(0, vocab, (N, R), generator=g)], 1)
    lens_t = torch.tensor(lens)
    attention = (torch.arange(width + R)[None, :] >= (width - lens_t)[:, None]).long()
    group = torch.arange(responses).repeat_interleave(states)
    return RolloutBatch(ids, attention, torch.ones(N, R), lens_t, torch.full((N,), R), torch.zeros(N, R),
                        torch.zeros(N), group, width)


class Measured:
    """FSDPMemTracker around one model's phase: the peak over the whole phase (run `iterations` times: AdamW's states
    exist from the first optimizer step on), by category (parameters, gradients, optimizer states, activations,
    temporaries). The tracker allows one root forward per iteration: its module statistics are reset before each
    (the peak is not), so a step of several micro-batches runs as written."""

    def __init__(self, model, optimizer=None):
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        self.model, self.tracker = model, FSDPMemTracker(model, optimizer)

    def run(self, phase, iterations: int = 2) -> dict[str, float]:
        from torch.nn.modules.module import register_module_forward_pre_hook
        # a global hook runs before the root's own (FSDP2's pre-forward, where the tracker checks)
        hook = register_module_forward_pre_hook(
            lambda module, _: self.tracker.reset_mod_stats() if module is self.model else None)
        try:
            with self.tracker:
                for _ in range(iterations):
                    phase()
        finally:
            hook.remove()
        peak = self.tracker.get_tracker_snapshot("peak")
        totals: dict[str, float] = {}
        for by_kind in peak.values():
            for kind, nbytes in by_kind.items():
                key = str(kind).split(".")[-1]
                totals[key] = totals.get(key, 0.0) + nbytes
        return totals


def resident_bytes(model, optimizer) -> float:
    """What a model holds on a rank between its updates: its fp32 parameter shards and AdamW's states."""
    from torch.distributed.tensor import DTensor
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    states = sum(local(v).numel() * local(v).element_size() for s in optimizer.state.values()
                 for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return float(params + states)


def rehearsal_args(model: str, algo: str, world: int, gpu_gb: float, extra: list[str] | None = None):
    """The flags a real run of `algo` at world `world` gets (train.py's shared and algorithm flags, the world-size
    defaults, the algorithm's checks), then the memory plan's choices for a `gpu_gb` CUDA card (memory.run_plan).
    -> (args, the plan's namespace)."""
    import argparse

    import memory
    from flags import add_run_arguments, algorithm_class, fill_planned_flags, follow_world_size, run_argument_error
    parser = argparse.ArgumentParser(prog="rehearse", add_help=False, allow_abbrev=False)
    add_run_arguments(parser)
    parser.set_defaults(micro_batch_size=None, gradient_checkpointing=None, share_prompts=None)  # as train.py
    algorithm_class(algo).add_arguments(parser)
    # --mini-batches 1: one optimizer step per update, whose peak is every step's (FSDPMemTracker: one per run)
    argv = ["--algo", algo, "--model", model, "--no-eval", "--mini-batches", "1", *(extra or [])]
    args = parser.parse_args(argv)
    follow_world_size(args, argv, world)
    if (message := run_argument_error(args, world)) is not None:
        raise SystemExit(f"rehearse: error: {message}")
    algorithm_class(algo).check_arguments(args)
    critic = getattr(args, "critic_model", None) or None
    _, planned = memory.run_plan(args, world, gpu_gb, critic, target="cuda")
    fill_planned_flags(args, planned)  # the last step of parsing, as in train.py
    return args, memory.plan_namespace(args, world, gpu_gb, critic)


def rehearse(model: str, algo: str, world: int = 8, gpu_gb: float = 80.0, extra: list[str] | None = None) -> dict:
    """Every trainer phase of `algo` at world `world`, measured; -> {"phases": {phase: {"tracker", "plan"}}, ...}
    (bytes). The plan's trainer part of a phase is compared: the engine and the 2 GB context are not the trainer's."""
    import memory
    from actor import adamw, load_actor, old_logprob_passes, stream_full_parameters
    from flags import algorithm_class
    from rollout import Step
    from update import UpdateSettings, ppo_update
    args, plan_args = rehearsal_args(model, algo, world, gpu_gb, extra)
    rows, facts = memory.plan(plan_args)
    parts = algorithm_class(algo).memory_parts
    device = torch.device("cpu")  # the fake tensors' device; the choices are made for "cuda"
    fake_process_group(world)
    out: dict = {"args": args, "plan_args": plan_args, "rows": rows, "facts": facts, "phases": {}}
    from unittest import mock

    import actor as actor_module
    with FakeLargeTensors(), mock.patch.object(actor_module, "read_full_state_dict", weights_from_config):
        actor = load_actor(model, device, world, args, target="cuda")
        optimizer = adamw(actor.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        shape = facts["actor"]
        mb = args.micro_batch_size
        group = min(args.rollouts_per_prompt, mb) if args.share_prompts else 1  # rollouts of a prompt packed
        # two micro-batches per optimizer step: the second's peak holds the first's gradients, as in a real step
        batch = lambda: synthetic_batch(2 * mb // group, group, plan_args.prompt_tokens,  # noqa: E731
                                        plan_args.response_tokens, shape.vocab)
        held = {}  # other models' resident bytes, added to a phase they do not train in

        def actor_update():
            b = batch()
            b.advantages = torch.ones_like(b.response_mask)
            ppo_update(actor, optimizer, b, UpdateSettings.of(args), device, world)

        measured = {"actor update": Measured(actor, optimizer).run(actor_update)}
        if "hidden states" in parts:
            probe = algorithm_class(algo)(args, actor, _MarkerTokenizer(), device, world)
            def features():  # the actor's no-grad pass with POISE's hidden states, pooled as they come
                b = batch()
                probe.features(b, old_logprob_passes(actor, b, args, device, hidden_layer=probe.layer))

            measured["actor update"] = _max(measured["actor update"], Measured(actor).run(features, 1))
        if "value critic" in parts:
            import critic as critic_module
            cuda_value_model = functools.partial(critic_module.load_value_model, target="cuda")
            with mock.patch.object(critic_module, "load_value_model", cuda_value_model):  # its device is the CPU
                critic = critic_module.PPO(args, actor, None, device, world)
            critic.warmup_steps = 0  # no pretrained-critic export from a rehearsal

            def value_update():
                b = batch()
                b.old_values, b.returns = torch.zeros_like(b.response_mask), torch.ones_like(b.response_mask)
                critic.after_update(b, Step(index=0, seed=0, generate=None, actor_passes=None, engine=None))

            measured["critic update"] = Measured(critic.model, critic.optimizer).run(value_update)
            held["critic"] = resident_bytes(critic.model, critic.optimizer)
        if "generative critic" in parts:
            critic_model = load_actor(plan_args.critic or model, device, world, args, target="cuda")
            critic_opt = adamw(critic_model.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay)
            from genac import critic_update_settings
            settings = critic_update_settings(args)  # GenerativeCritic.update's

            def critic_update():
                b = genac_critic_batch(plan_args.prompt_tokens, plan_args.response_tokens, args.segment_tokens,
                                       memory.ICC_TEMPLATE_TOKENS, plan_args.critic_new_tokens, 1, shape.vocab)
                b = b.select(torch.arange(len(b))[-2 * mb:])  # two micro-batches of the longest states: the peak
                b.advantages = torch.ones_like(b.response_mask)
                ppo_update(critic_model, critic_opt, b, settings, device, world)

            measured["critic update"] = Measured(critic_model, critic_opt).run(critic_update)
            held["critic"] = resident_bytes(critic_model, critic_opt)

        def sync():
            for _ in stream_full_parameters(actor, args.sync_bucket_mb, torch.bfloat16):
                pass

        measured["sync"] = Measured(actor, optimizer).run(sync, 1)
        held_actor = resident_bytes(actor, optimizer)
    dist.destroy_process_group()
    trainer_rows = [(name, cells) for name, cells in rows if not memory.engine_row(name)]
    for phase, kinds in measured.items():
        tracked = kinds.get("Total", sum(kinds.values()))
        tracked += sum(v for k, v in held.items() if k not in phase)  # the critic's state in the actor's phases
        tracked += held_actor if phase == "critic update" else 0.0  # the actor's state in the critic's
        planned = sum(cells.get(phase, 0.0) for _, cells in trainer_rows)
        out["phases"][phase] = {"tracker": tracked, "plan": planned, "kinds": kinds}
    return out


def _max(a: dict, b: dict) -> dict:
    return a if a.get("Total", 0) >= b.get("Total", 0) else b


class _MarkerTokenizer:
    """POISE asks its tokenizer only for the `<think>` markers' ids; a config has no tokenizer."""

    @staticmethod
    def encode(text: str, add_special_tokens: bool = False) -> list[int]:
        return [7, 8] if text == "<think>" else [7, 9]


def render(result: dict, gpu_gb: float) -> str:
    """The per-phase table and the last line: worst |plan / tracker - 1|, least free GB of the card."""
    import memory
    facts, rows = result["facts"], result["rows"]
    totals = memory.totals(rows, facts["phases"])
    lines = ["| phase (trainer, per GPU) | plan GB | tracker GB | plan / tracker | phase total with engine, GB | "
             "free GB |", "|---|---|---|---|---|---|"]
    worst, least_free = 0.0, float("inf")
    for phase, m in result["phases"].items():
        ratio = m["plan"] / max(m["tracker"], 1.0)
        whole = totals[phase] - m["plan"] + max(m["plan"], m["tracker"])  # the engine's and context's share added
        free = gpu_gb - whole / GB
        worst, least_free = max(worst, abs(ratio - 1)), min(least_free, free)
        if os.environ.get("REHEARSE_KINDS"):
            print(phase, {k: round(v / GB, 2) for k, v in m["kinds"].items()}, file=sys.stderr)
        lines.append(f"| {phase} | {m['plan'] / GB:.1f} | {m['tracker'] / GB:.1f} | {ratio:.2f} | {whole / GB:.1f} | "
                     f"{free:.1f} |")
    for phase in facts["phases"]:
        if phase not in result["phases"]:  # engine phases: no trainer computation to rehearse
            least_free = min(least_free, gpu_gb - totals[phase] / GB)
    a = result["args"]
    lines.append(f"settings: --micro-batch-size {a.micro_batch_size} --{'' if a.gradient_checkpointing else 'no-'}"
                 f"gradient-checkpointing --{'' if a.share_prompts else 'no-'}share-prompts "
                 f"--gpu-memory-utilization {a.gpu_memory_utilization:g}")
    lines.append(f"rehearsal: worst |plan/tracker - 1| = {worst:.2f} over {len(result['phases'])} phases; "
                 f"least free {least_free:.1f} GB of {gpu_gb:g} GB")
    result.update(worst=worst, least_free=least_free)
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(prog="eval.py memory --rehearse", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="config.json or model folder (no weights read)")
    ap.add_argument("--algo", default="grpo")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    args, extra = ap.parse_known_args(argv)
    result = rehearse(args.model, args.algo, args.world, args.gpu_gb, extra)
    print(render(result, args.gpu_gb), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
