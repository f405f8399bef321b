"""The memory plan: what one GPU (one torchrun rank) holds in each phase of a step, from parameter counts.

    python eval.py memory --model CONFIG --world 8                               # GRPO / RLOO
    python eval.py memory --model CONFIG --critic CONFIG --algo genac --world 8  # GenAC: two models, one engine

CONFIG is a Hugging Face config.json or a model folder; the model is built on the meta device (no weights are
read), so any size works. train.py computes the same plan before it loads anything (`run_plan`): on a GPU it
refuses a plan that does not fit, naming the phase, the bytes over and the flag to change. Flags left unset
(--micro-batch-size, --gradient-checkpointing, --gpu-memory-utilization) are chosen from the plan (`choose_defaults`):
the cheapest setting that leaves --margin-gb in every phase. Figures are estimates (GB = 1e9 bytes), the code's layout:

    trainer state (FSDP2, sharded over --world)   fp32 master weights 4P/W + AdamW m, v 8P/W in every phase; fp32
                                                  gradients 4P/W only in that model's update (update.optimizer_steps
                                                  frees them, set_to_none, after its last optimizer step)
    update, in flight (GPU: MixedPrecisionPolicy) bf16 all-gathered root (embeddings, LM head) for the whole pass;
                                                  at the peak, the larger of the logits' backward temporaries and 2
                                                  decoder layers (bf16 + fp32 gradients before their reduce-scatter)
    activations per micro-batch                   tokens x layers x (27 H + 6 H_kv + 8 I) bytes kept for backward
                                                  (bf16); --gradient-checkpointing keeps 2 H per token per layer plus
                                                  one layer's full set during its recompute
    logits                                        response tokens x vocab x (4 + 16) bytes (the fp32 logits / T kept for
                                                  backward + the backward's temporaries; FSDPMemTracker, rehearse)
    vLLM engine awake (generate, judge)           --gpu-memory-utilization x GPU (vLLM's budget): bf16 weights 2P + its
                                                  profiling peak (a forward of max_num_batched_tokens tokens: one
                                                  layer's bf16 activations; the sampler on max_num_seqs rows: fp32
                                                  logits and their sort, ~6 fp32 copies of [max_num_seqs, vocab]) + KV
                                                  cache (the rest); CUDA graphs (~1 GB, captured after the KV cache)
                                                  on top
    engine asleep (updates)                       level 2: ~0 on the GPU (weights and KV dropped: the sync replaces
                                                  them)
    weight sync                                   engine weights awake, KV cache still asleep (wake weights -> load ->
                                                  wake KV) + 2 buckets (--sync-bucket-mb, gathered + unpacked) + the
                                                  largest single tensor in bf16 (a tensor over a bucket is gathered
                                                  alone: the embedding or LM head) + one decoder layer in bf16 (vLLM
                                                  buffers a layer's q/k/v until complete)
    CUDA context, NCCL buffers, allocator slack   2 GB (a round figure, not derived)

One engine per process: GenAC's critic, of the actor's architecture, is served by the actor's engine with its
weights swapped in (engine.VLLMEngine), so the judge phase holds the critic's bf16 weights in the same budget and
nothing of either engine stays on the GPU during the updates. V0.5 adds its frozen embedder (all-MiniLM-L6-v2, 23M
parameters); POISE keeps one decoder layer's hidden states of a micro-batch in the old-log-prob pass
(tokens x H x 2 bytes); their buffers live in host RAM.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from flags import (ALGORITHMS, ENGINE_MAX_NUM_BATCHED_TOKENS, ENGINE_MAX_NUM_SEQS, MARGIN_GB, SYNC_BUCKET_MB,
                   add_engine_arguments, algorithm_class)

GB = 1e9
CONTEXT_GB = 2.0  # CUDA context, NCCL buffers, allocator slack: a round figure
CUDA_GRAPHS_GB = 1.0  # vLLM's captured decode graphs: vLLM 0.32 estimates them in its profiling run and takes them
# out of the --gpu-memory-utilization budget (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1, its default): counted once
SAMPLER_COPIES = 6  # fp32 [max_num_seqs, vocab] tensors alive in vLLM's profiled sampler run (logits, log-probs, sort)
SAVED_LOGIT_BYTES = 4  # per (response token, vocab entry): the fp32 logits / T kept for backward (FSDPMemTracker)
LOGIT_TEMP_BYTES = 16  # the backward's temporaries on them (softmax, its gradient), at the update's peak (idem)
LAYER_ACTIVATION_BYTES = (27, 6, 8)  # saved per token per layer: 27 H + 6 H_kv + 8 I bytes (Qwen3-8B: 215 KB, idem)
EMBEDDER_PARAMETERS = 22_713_216  # V0.5's prior embedder, all-MiniLM-L6-v2
MASK_BYTES = 3  # per (query, key) pair of a packed row: the bool mask and SDPA's additive bf16 copy of it
ICC_TEMPLATE_TOKENS = 200  # GenAC's ICC template around a state, in critic tokens (genac.icc_prompt: ~150-200)
PHASES = ("generate", "judge", "actor update", "critic update", "sync")
CARD_GB = {"h100": 85.5, "a100-80gb": 85.9, "h200": 150.7}  # total memory as CUDA reports it (nvidia-smi MiB x 2^20),
# which is what train.py plans with; the "80 GB" of a card's name is less
CPU_DEFAULTS = {"micro_batch_size": 16, "gradient_checkpointing": False, "gpu_memory_utilization": 0.3}


@dataclass
class Shape:
    """What the plan needs of a model: parameter counts and the sizes the activations scale with."""

    parameters: int  # unique parameters (a tied LM head once)
    root: int  # embeddings + LM head + final norm: FSDP2's root unit, all-gathered for the whole pass
    layer: int  # one decoder layer
    layers: int
    hidden: int
    kv: int  # key/value width: kv heads x head dim
    intermediate: int
    vocab: int
    largest: int = 0  # the largest single tensor (embedding or LM head): the sync gathers it alone


def model_shape(config_path: str, value_head: bool = False) -> Shape:
    """A Hugging Face config (config.json or its folder) -> Shape, counting the parameters of the model built on
    the meta device (no weights read). value_head: a PPO critic (token classification, one label)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

    path = Path(config_path)  # a config.json, a folder, or a Hugging Face name (only its config is fetched)
    if not path.exists() and (path.suffix == ".json" or config_path.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"{config_path}: no such config.json or model folder")
    config = AutoConfig.from_pretrained(str(path.parent if path.is_file() else path), num_labels=1)
    with torch.device("meta"):
        model = (AutoModelForTokenClassification if value_head else AutoModelForCausalLM).from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    layers = next(m for m in model.modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == config.num_hidden_layers)
    layer = sum(p.numel() for p in layers[0].parameters())
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return Shape(parameters=parameters, root=parameters - layer * len(layers), layer=layer, layers=len(layers),
                 hidden=hidden, kv=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
                 intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
                 vocab=0 if value_head else config.vocab_size, largest=max(p.numel() for p in model.parameters()))


def trainer_state(s: Shape, world: int) -> float:
    """fp32 master shard + AdamW (m, v) shard, in bytes: held in every phase."""
    return 12 * s.parameters / world


def gradients(s: Shape, world: int) -> float:
    """fp32 gradient shard, in bytes: only during that model's update (freed after its last optimizer step)."""
    return 4 * s.parameters / world


def update_peak(s: Shape, tokens: int, response_tokens: int, checkpointing: bool) -> dict[str, float]:
    """Bytes in flight at one micro-batch's peak, as the rehearsal measures it (tools/rehearse.py): FSDP2's all-gathered
    bf16 root (embeddings, LM head) for the whole pass, every layer's saved activations, the fp32 logits kept for
    backward, then the backward's largest transient: the logits' temporaries at its start, or (short responses, a
    value head) two decoder layers in flight (bf16 all-gathered + fp32 gradients before their reduce-scatter)."""
    h, kv, inter = LAYER_ACTIVATION_BYTES
    per_token_layer = h * s.hidden + kv * s.kv + inter * s.intermediate
    if checkpointing:  # each layer's input kept; one layer's full set during its recompute
        activations = tokens * (2 * s.hidden * s.layers + per_token_layer)
    else:
        activations = tokens * per_token_layer * s.layers
    logit_entries = response_tokens * s.vocab
    return {
        "FSDP2 all-gathered bf16 root (embeddings, LM head)": 2 * s.root,
        "activations kept for backward": activations,
        "logits kept for backward (fp32, response tokens x vocab)": logit_entries * SAVED_LOGIT_BYTES,
        "backward transient: logits' temporaries or 2 layers in flight": max(logit_entries * LOGIT_TEMP_BYTES,
                                                                              2 * (2 + 4) * s.layer),
    }


def engine_profile_peak(s: Shape, max_num_seqs: int, max_num_batched_tokens: int) -> float:
    """vLLM's profiling run (gpu_worker.determine_available_memory): a forward of max_num_batched_tokens tokens (one
    layer's bf16 activations alive: residual, norm, q/k/v, attention out, gate/up, act) and the sampler on max_num_seqs
    rows (~SAMPLER_COPIES fp32 [rows, vocab]); vLLM keeps this peak out of the KV cache."""
    forward = max_num_batched_tokens * (4 * s.hidden + 2 * s.kv + 3 * s.intermediate) * 2
    return forward + max_num_seqs * s.vocab * 4 * SAMPLER_COPIES


def genac_critic_micro_batch(args, mb: int) -> tuple[int, int, float]:
    """GenAC's critic update at micro-batch `mb`: the states of one response (one every --segment-tokens response
    tokens), each reading the ICC template, the problem and y_<b_k, then answering. Packed (--pack-critic-states,
    the default) they are one row: the longest state once + each state's closing part and answer, attending through a
    dense [W, W] mask (bool, plus its additive copy in the compute dtype inside SDPA); unpacked, mb rows.
    -> (tokens, answer tokens, mask bytes)."""
    states = min(mb, -(-args.response_tokens // max(args.segment_tokens, 1)))
    prompt = args.prompt_tokens + args.response_tokens + ICC_TEMPLATE_TOKENS  # the longest state
    if not args.pack_critic_states:
        return states * (prompt + args.critic_new_tokens), states * args.critic_new_tokens, 0.0
    width = prompt + states * (ICC_TEMPLATE_TOKENS // 2 + args.critic_new_tokens)
    return width, states * args.critic_new_tokens, MASK_BYTES * width ** 2


def kv_bytes_per_token(s: Shape) -> int:
    return 2 * s.layers * s.kv * 2  # K and V, bf16


def plan(args) -> tuple[list[tuple[str, dict[str, float]]], dict]:
    """-> rows [(component, {phase: bytes})], facts. Phases absent for this algorithm are left out."""
    actor = model_shape(args.model)
    parts = algorithm_class(args.algo).memory_parts  # what the algorithm adds to the actor and its engine
    genac, ppo = "generative critic" in parts, "value critic" in parts
    critic = model_shape(args.critic or args.model, value_head=ppo) if genac or ppo else None
    gpu, W, mb = args.gpu_gb * GB, args.world, args.micro_batch_size
    seq = args.prompt_tokens + args.response_tokens
    phases = [p for p in PHASES if (p != "judge" or genac) and (p != "critic update" or critic)]
    everywhere = dict.fromkeys(phases)
    rows = [
        ("actor: fp32 weights + AdamW (shard)", {p: trainer_state(actor, W) for p in everywhere}),
        ("actor: fp32 gradients (shard; freed after its update)", {"actor update": gradients(actor, W)}),
    ]
    if critic:
        rows += [
            ("critic: fp32 weights + AdamW (shard)", {p: trainer_state(critic, W) for p in everywhere}),
            ("critic: fp32 gradients (shard; freed after its update)", {"critic update": gradients(critic, W)}),
        ]
    critic_seq = seq + args.critic_new_tokens + ICC_TEMPLATE_TOKENS if genac else seq  # GenAC: ICC prompt + answer
    served = {"generate": actor, "judge": critic} if genac else {"generate": actor}  # GenAC swaps weights in one engine
    budget = args.gpu_memory_utilization * gpu
    peak = {p: engine_profile_peak(actor, args.engine_max_num_seqs, args.engine_max_num_batched_tokens) for p in served}
    weights = {p: 2 * m.parameters for p, m in served.items()}
    rows.append(("engine: bf16 weights" + (" (judge: the critic's, swapped in)" if genac else ""),
                 {**weights, "sync": 2 * actor.parameters}))
    rows.append(("engine: profiling peak (batched-token forward + sampler)", peak))
    graphs = CUDA_GRAPHS_GB * GB
    rows.append(("engine: CUDA graphs (vLLM 0.32 takes them out of its budget)", {p: graphs for p in served}))
    rows.append(("engine: KV cache (the rest of --gpu-memory-utilization)",
                 {p: budget - weights[p] - peak[p] - graphs for p in served}))
    for name, value in update_peak(actor, mb * seq, mb * args.response_tokens, args.gradient_checkpointing).items():
        rows.append((f"actor update: {name}", {"actor update": value}))
    if critic:
        if genac:  # one micro-batch of a response's critic states (Eq. 4 of arXiv:2604.10701)
            tokens, answers, mask = genac_critic_micro_batch(args, mb)
        else:  # the value critic reads the actor's rows; no LM head (vocab 0)
            tokens, answers, mask = mb * seq, 0, 0
        for name, value in update_peak(critic, tokens, answers, args.gradient_checkpointing).items():
            rows.append((f"critic update: {name}", {"critic update": value}))
        if mask:
            rows.append(("critic update: packed row's dense attention mask", {"critic update": mask}))
    bucket = args.sync_bucket_mb * 2**20
    rows.append(("sync: 2 buckets (gathered + unpacked)", {"sync": 2 * bucket}))
    rows.append(("sync: largest single tensor, bf16 (gathered alone)",
                 {"sync": 2 * actor.largest if 2 * actor.largest > bucket else 0}))
    rows.append(("sync: one decoder layer, bf16 (vLLM buffers it)", {"sync": 2 * actor.layer}))
    if "prior embedder" in parts:
        rows.append(("V0.5 prior embedder (fp32)", {p: 4 * EMBEDDER_PARAMETERS for p in everywhere}))
    if "hidden states" in parts:
        rows.append(("POISE: one layer's hidden states of a micro-batch (no-grad pass)",
                     {"actor update": 2 * mb * seq * actor.hidden}))
    rows.append(("CUDA context, NCCL, allocator slack", {p: CONTEXT_GB * GB for p in everywhere}))
    kv = min(budget - weights[p] - peak[p] - graphs for p in served)
    max_model_len = max(seq, critic_seq)
    facts = {"actor": actor, "critic": critic, "phases": phases, "gpu": gpu, "kv_gb": kv / GB,
             "max_model_len": max_model_len, "kv_sequences": kv / (kv_bytes_per_token(actor) * max_model_len),
             "host_gb_rank0": 4 * actor.parameters / GB}
    return rows, facts


def engine_row(name: str) -> bool:
    """Rows of the engine and the CUDA context: what the trainer's code does not allocate (the rehearsal leaves them
    out of its comparison)."""
    return name.startswith(("engine:", "CUDA context", "sync: one decoder layer"))


def totals(rows, phases) -> dict[str, float]:
    return {p: sum(cells.get(p, 0.0) for _, cells in rows) for p in phases}


LEVERS = {"generate": "--gpu-memory-utilization", "judge": "--gpu-memory-utilization",
          "actor update": "--micro-batch-size or --gradient-checkpointing",
          "critic update": "--micro-batch-size or --gradient-checkpointing",
          "sync": "--sync-bucket-mb or --gpu-memory-utilization"}


def verdict(rows, facts, margin_gb: float = 0.0) -> tuple[bool, str]:
    """-> (fits, one line): the fullest phase and what it leaves, or the first phase over, by how much, which flag."""
    phases, gpu, total = facts["phases"], facts["gpu"], totals(rows, facts["phases"])
    over = [p for p in phases if total[p] > gpu - margin_gb * GB]
    if facts["kv_gb"] <= 0 or facts["kv_sequences"] < 1:
        return False, (f"DOES NOT FIT: the engine's KV cache ({facts['kv_gb']:.1f} GB) cannot hold one "
                       f"{facts['max_model_len']}-token sequence; raise --gpu-memory-utilization or lower "
                       "--engine-max-num-seqs")
    if over:
        p = over[0]
        return False, (f"DOES NOT FIT: {p} needs {total[p] / GB:.1f} GB of {gpu / GB:.0f} GB"
                       + (f" (with {margin_gb:g} GB left)" if margin_gb else "")
                       + f", {(total[p] - gpu + margin_gb * GB) / GB:.1f} GB over; change {LEVERS[p]}, or use more "
                       "GPUs (--world / torchrun ranks)")
    worst = max(phases, key=lambda p: total[p])
    return True, f"fits: the fullest phase ({worst}) leaves {(gpu - total[worst]) / GB:.1f} GB"


# The flags the plan chooses when they are left unset (train.py prints what it chose)
PLANNED_FLAGS = ("micro_batch_size", "gradient_checkpointing", "gpu_memory_utilization", "engine_max_num_seqs",
                 "engine_max_num_batched_tokens")


def choose_defaults(inputs, margin_gb: float = MARGIN_GB) -> list[str]:
    """Fill the flags left None in the plan's inputs (plan_namespace's, or eval.py memory's flags; never a run's
    args): the largest micro-batch without gradient checkpointing whose updates leave `margin_gb` (else with
    checkpointing), then the largest engine share (<= 0.85) whose generate/judge/sync leave it, and vLLM's batch
    limits (ENGINE_MAX_NUM_SEQS / _BATCHED_TOKENS). -> the names it chose."""
    chosen = [k for k in PLANNED_FLAGS if getattr(inputs, k) is None]
    if inputs.engine_max_num_seqs is None:
        inputs.engine_max_num_seqs = ENGINE_MAX_NUM_SEQS
    if inputs.engine_max_num_batched_tokens is None:
        inputs.engine_max_num_batched_tokens = ENGINE_MAX_NUM_BATCHED_TOKENS
    share = inputs.gpu_memory_utilization
    inputs.gpu_memory_utilization = 0.5 if share is None else share  # the updates do not depend on it
    candidates = [(c if inputs.gradient_checkpointing is None else inputs.gradient_checkpointing,
                   m if inputs.micro_batch_size is None else inputs.micro_batch_size)
                  for c in (False, True) for m in (16, 8, 4, 2, 1)]
    for checkpointing, micro in candidates:
        inputs.gradient_checkpointing, inputs.micro_batch_size = checkpointing, micro
        rows, facts = plan(inputs)
        total = totals(rows, facts["phases"])
        if all(total[p] <= facts["gpu"] - margin_gb * GB for p in facts["phases"] if "update" in p):
            break
    if share is None:
        for share in [x / 100 for x in range(85, 4, -1)]:
            inputs.gpu_memory_utilization = share
            rows, facts = plan(inputs)
            total = totals(rows, facts["phases"])
            if all(total[p] <= facts["gpu"] - margin_gb * GB for p in facts["phases"] if "update" not in p):
                break
    return chosen


def render(rows, facts, args) -> str:
    phases, gpu = facts["phases"], facts["gpu"]
    fmt = lambda b: f"{b / GB:.1f}" if b else "-"  # noqa: E731
    out = [f"| per GPU, GB ({args.world} x {args.gpu_gb:g} GB, --algo {args.algo}) | " + " | ".join(phases) + " |",
           "|---|" + "---|" * len(phases)]
    out += [f"| {name} | " + " | ".join(fmt(cells.get(p, 0.0)) for p in phases) + " |" for name, cells in rows]
    total = totals(rows, phases)
    out.append("| **total** | " + " | ".join(f"**{total[p] / GB:.1f}**" for p in phases) + " |")
    out.append("| free | " + " | ".join(f"{(gpu - total[p]) / GB:.1f}" for p in phases) + " |")
    a, c = facts["actor"], facts["critic"]
    notes = [
        f"actor: {a.parameters / 1e9:.2f}B parameters ({a.layers} layers, hidden {a.hidden}, vocab {a.vocab})"
        + (f"; critic: {c.parameters / 1e9:.2f}B" if c else ""),
        f"settings: --micro-batch-size {args.micro_batch_size} "
        f"--{'' if args.gradient_checkpointing else 'no-'}gradient-checkpointing "
        f"--gpu-memory-utilization {args.gpu_memory_utilization:g} --engine-max-num-seqs {args.engine_max_num_seqs} "
        f"--engine-max-num-batched-tokens {args.engine_max_num_batched_tokens}",
        f"engine: {args.gpu_memory_utilization:g} x {args.gpu_gb:g} GB; KV cache {facts['kv_gb']:.1f} GB = "
        f"{facts['kv_sequences']:.0f} sequences of {facts['max_model_len']} tokens at once",
        f"host RAM: ~{facts['host_gb_rank0']:.0f} GB on rank 0 while it reads the checkpoint in fp32; the other ranks "
        "build on the meta device and receive their shards (actor.load_actor)"]
    return "\n".join(out + [""] + notes + [verdict(rows, facts)[1]])


def add_plan_arguments(parser, model_flags: bool) -> None:
    """The plan's own flags (eval.py memory; train.py shares the ones of the same name)."""
    a = parser.add_argument
    if model_flags:
        a("--model", required=True, help="the actor's config.json or model folder (only the config is read)")
        a("--critic", default=None, help="the critic's config (GenAC, PPO; default: --model)")
        a("--algo", default="grpo", choices=tuple(ALGORITHMS))
        a("--world", type=int, default=8, help="GPUs the models are sharded over (torchrun ranks)")
        a("--prompt-tokens", type=int, default=512, help="train.py --max-prompt-tokens")
        a("--response-tokens", type=int, default=2048, help="train.py --max-new-tokens")
        a("--critic-new-tokens", type=int, default=1024, help="GenAC --critic-max-new-tokens")
        a("--segment-tokens", type=int, default=120, help="GenAC --segment-tokens (a critic state per segment)")
        a("--pack-critic-states", action=argparse.BooleanOptionalAction, default=True,
          help="GenAC: a response's critic states in one packed row (the default) or a row each")
        a("--micro-batch-size", type=int, default=None, help="rollouts per forward/backward (default: from the plan)")
        a("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
          help="default: from the plan")
        a("--sync-bucket-mb", type=float, default=SYNC_BUCKET_MB)
        a("--gpu-gb", type=float, default=80.0, help="each GPU's capacity in 1e9 bytes (train.py uses what the card "
          "reports to torch.cuda.mem_get_info; --gpu names one)")
        a("--gpu", choices=tuple(CARD_GB), default=None, help="plan for this card's reported capacity (train.py's "
          "view of it): " + ", ".join(f"{k} {v:g} GB" for k, v in CARD_GB.items()))
    add_engine_arguments(parser)  # --gpu-memory-utilization, --engine-max-num-*, --margin-gb (flags.py)


def memory_main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="eval.py memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plan_arguments(ap, model_flags=True)
    args = ap.parse_args(argv)
    if args.gpu:
        args.gpu_gb = CARD_GB[args.gpu]
    try:
        chosen = choose_defaults(args, args.margin_gb)
        rows, facts = plan(args)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(render(rows, facts, args) + (f"\n(chosen from the plan: {', '.join(chosen)})" if chosen else ""))


def share_prompts_default(target: str) -> bool:
    """--share-prompts left unset: on for a CPU run, off on a GPU, whose SDPA kernels run a packed row's dense [T, T]
    mask (packing.pack_shared_prompts) over all T^2 pairs, materialised: more FLOPs and memory than the tokens packing
    saves at GPU lengths (the figures: docs/memory.md)."""
    return target != "cuda"


def device_capacity_gb(device) -> float | None:
    """The plan's capacity for --gpu-gb left unset: the card's total as CUDA reports it (an H100 80 GB: ~85.0 GB, a
    H200: ~150 GB; torch.cuda.mem_get_info), None on the CPU (the plan is printed, not checked). The one place the
    plan asks the device (the rehearsal answers it with --gpu-gb)."""
    import torch
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[1] / GB


def plan_namespace(args, world: int, gpu_gb: float | None, critic_path: str | None, model_path: str | None = None):
    """train.py's parsed flags -> the plan's inputs (eval.py memory's flags). model_path: the actor's config or folder
    when it is not args.model (train.py's resolved base model)."""
    from types import SimpleNamespace
    return SimpleNamespace(model=model_path or args.model, critic=critic_path, algo=args.algo, world=world,
                           gpu_gb=gpu_gb or 80.0, prompt_tokens=args.max_prompt_tokens,
                           response_tokens=args.max_new_tokens,
                           critic_new_tokens=getattr(args, "critic_max_new_tokens", None) or 0,
                           sync_bucket_mb=args.sync_bucket_mb, segment_tokens=getattr(args, "segment_tokens", 120),
                           pack_critic_states=getattr(args, "pack_critic_states", True),
                           **{k: getattr(args, k) for k in PLANNED_FLAGS})


def run_plan(args, world: int, gpu_gb: float | None, critic_path: str | None, target: str,
             model_path: str | None = None) -> tuple[str, dict]:
    """train.py, before anything loads: the plan's defaults, checked. target: the device type trained on ("cuda",
    "cpu"); model_path: the actor's config or folder (default args.model). gpu_gb None (a CPU run without --gpu-gb):
    the CPU defaults, and one line. Else the defaults chosen from the plan, and SystemExit naming the phase, the bytes
    over and the flag when it does not fit. `args` is only read.
    -> (the line to print, {flag: the value the run uses} for PLANNED_FLAGS and "share_prompts": a flag left unset
    as the plan chose it; on a CPU target the engine's batch limits stay the caller's, vLLM's own when unset)."""
    share = share_prompts_default(target) if getattr(args, "share_prompts", None) is None else args.share_prompts
    plan_args = plan_namespace(args, world, gpu_gb, critic_path, model_path)
    if gpu_gb is None:
        for key, value in CPU_DEFAULTS.items():
            setattr(plan_args, key, value if getattr(plan_args, key) is None else getattr(plan_args, key))
        chosen = []
        plan_args.engine_max_num_seqs = plan_args.engine_max_num_seqs or ENGINE_MAX_NUM_SEQS
        plan_args.engine_max_num_batched_tokens = (plan_args.engine_max_num_batched_tokens
                                                   or ENGINE_MAX_NUM_BATCHED_TOKENS)
    else:
        chosen = choose_defaults(plan_args, args.margin_gb)
    carried = PLANNED_FLAGS if target == "cuda" else PLANNED_FLAGS[:3]  # on the CPU the engine keeps vLLM's limits
    planned = {k: getattr(plan_args if k in carried else args, k) for k in PLANNED_FLAGS} | {"share_prompts": share}
    rows, facts = plan(plan_args)
    fits, line = verdict(rows, facts)
    settings = (f"--micro-batch-size {planned['micro_batch_size']} "
                f"--{'' if planned['gradient_checkpointing'] else 'no-'}gradient-checkpointing "
                f"--{'' if share else 'no-'}share-prompts "
                f"--gpu-memory-utilization {planned['gpu_memory_utilization']:g}"
                + (f" (chosen from the plan: {', '.join(chosen)})" if chosen else ""))
    total = totals(rows, facts["phases"])
    phases = ", ".join(f"{p} {total[p] / GB:.1f}" for p in facts["phases"])
    if gpu_gb is not None and not fits:
        raise SystemExit(f"error: the memory plan ({world} x {gpu_gb:g} GB) {line}. Per phase, GB: {phases}. "
                         f"Full table: python eval.py memory --model {plan_args.model} --algo {args.algo} "
                         f"--world {world} --gpu-gb {gpu_gb:g}")
    where = f"{world} x {gpu_gb:g} GB" if gpu_gb else f"{world} x 80 GB GPUs (this CPU run is not checked)"
    table = (f"python eval.py memory --model {plan_args.model} --algo {args.algo} --world {world} "
             f"--gpu-gb {gpu_gb or 80:g} --prompt-tokens {args.max_prompt_tokens} "
             f"--response-tokens {args.max_new_tokens}"
             + (f" --critic-new-tokens {args.critic_max_new_tokens} --segment-tokens {args.segment_tokens}"
                if getattr(args, "critic_max_new_tokens", None) else "")
             + ("" if getattr(args, "pack_critic_states", True) else " --no-pack-critic-states")
             + (f" --critic {critic_path}" if critic_path else ""))
    return f"[plan] {where}: {line}; per phase, GB: {phases}; {settings}; the same table: {table}", planned
