"""The memory plan: what one GPU (one torchrun rank) holds in each phase of a step, from parameter counts.

    python eval.py memory --model CONFIG --world 8                               # GRPO / RLOO
    python eval.py memory --model CONFIG --critic CONFIG --algo genac --world 8  # GenAC: two models, two engines

CONFIG is a Hugging Face config.json or a model folder; the model is built on the meta device (no weights are
read), so any size works. Figures are estimates (GB = 1e9 bytes) from these rules, the code's own layout:

    trainer state (FSDP2, sharded over --world)   fp32 master weights 4P/W + AdamW m, v 8P/W + fp32 gradients 4P/W;
                                                  the gradients stay allocated between updates (zero_grad at the
                                                  start of the next step), so every phase carries all 16P/W
    update, in flight (GPU: MixedPrecisionPolicy) bf16 all-gathered root (embeddings, LM head) for the whole pass,
                                                  2 decoder layers bf16 (current + prefetch), 2 layers' fp32 gradients
                                                  before their reduce-scatter
    activations per micro-batch                   tokens x layers x (24 H + 6 H_kv + 8 I) bytes kept for backward
                                                  (bf16); --gradient-checkpointing keeps 2 H per token per layer plus
                                                  one layer's full set during its recompute
    logits                                        response tokens x vocab x 12 bytes (bf16 logits, the fp32 logits / T
                                                  kept for backward, their softmax in backward)
    vLLM engine awake                             --gpu-memory-utilization x GPU: bf16 weights 2P + activations + KV
                                                  cache (the rest); asleep (level 1): ~0 on the GPU, 2P of host RAM
    weight sync                                   2 buckets (--sync-bucket-mb, gathered + unpacked) + the largest
                                                  decoder layer in bf16 (vLLM buffers a layer's q/k/v until complete)
    CUDA context, NCCL buffers, allocator slack   2 GB (a round figure, not derived)

Which engine sleeps when: the actor's engine is awake for generation and the weight sync, asleep (vLLM sleep level
1: KV cache dropped, weights to host RAM) from the end of generation to the sync. GenAC's critic engine has sleep
mode off and stays awake: vLLM's sleep mode is one allocator per process (CuMemAllocator), so sleeping the actor's
engine would also unmap the critic engine that judges while the actor's sleeps. V0.5 adds its frozen embedder
(all-MiniLM-L6-v2, 23M parameters); POISE keeps one decoder layer's hidden states of a micro-batch in the
old-log-prob pass (tokens x H x 2 bytes); their buffers live in host RAM.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from actor import SYNC_BUCKET_MB

GB = 1e9
CONTEXT_GB = 2.0  # CUDA context, NCCL buffers, allocator slack: a round figure
LOGIT_BYTES = 12  # per (response token, vocab entry) in the update: bf16 logits + fp32 logits / T + softmax in backward
EMBEDDER_PARAMETERS = 22_713_216  # V0.5's prior embedder, all-MiniLM-L6-v2
PHASES = ("generate", "judge", "actor update", "critic update", "sync")


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
    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == config.num_hidden_layers)
    layer = sum(p.numel() for p in layers[0].parameters())
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return Shape(parameters=parameters, root=parameters - layer * len(layers), layer=layer, layers=len(layers), hidden=hidden,
                 kv=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
                 intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
                 vocab=0 if value_head else config.vocab_size)


def trainer_state(s: Shape, world: int) -> float:
    """fp32 master shard + AdamW (m, v) shard + fp32 gradient shard, in bytes."""
    return 16 * s.parameters / world


def update_peak(s: Shape, tokens: int, response_tokens: int, checkpointing: bool) -> dict[str, float]:
    """Bytes in flight during one micro-batch's forward/backward: FSDP2 buffers, activations, logits."""
    per_token_layer = 24 * s.hidden + 6 * s.kv + 8 * s.intermediate  # bf16 tensors saved for backward
    if checkpointing:
        activations = tokens * (2 * s.hidden * s.layers + per_token_layer)
    else:
        activations = tokens * per_token_layer * s.layers
    return {"FSDP2 all-gathered bf16 params + fp32 grads in flight": 2 * s.root + 2 * 2 * s.layer + 2 * 4 * s.layer,
            "activations kept for backward": activations, "logits (response tokens x vocab)": response_tokens * s.vocab * LOGIT_BYTES}


# What each algorithm adds to the actor and its engine (one table: the planner names no algorithm in its logic)
PARTS = {"grpo": set(), "rloo": set(), "ppo": {"value critic"}, "vcppo": {"value critic"},
         "genac": {"generative critic"}, "v05": {"prior embedder"}, "poise": {"hidden states"}}


def plan(args) -> tuple[list[tuple[str, dict[str, float]]], dict]:
    """-> rows [(component, {phase: bytes})], facts. Phases absent for this algorithm are left out."""
    actor = model_shape(args.model)
    parts = PARTS[args.algo]
    genac, ppo = "generative critic" in parts, "value critic" in parts
    critic = model_shape(args.critic or args.model, value_head=ppo) if genac or ppo else None
    gpu, W, mb = args.gpu_gb * GB, args.world, args.micro_batch_size
    seq = args.prompt_tokens + args.response_tokens
    phases = [p for p in PHASES if (p != "judge" or genac) and (p != "critic update" or critic)]
    everywhere = dict.fromkeys(phases)
    rows = [("actor: fp32 weights + AdamW + fp32 grads (shard)", {p: trainer_state(actor, W) for p in everywhere})]
    if critic:
        rows.append(("critic: fp32 weights + AdamW + fp32 grads (shard)", {p: trainer_state(critic, W) for p in everywhere}))
    engine = args.gpu_memory_utilization * gpu
    rows.append(("actor engine (vLLM): asleep in the updates", {"generate": engine, "sync": engine}))
    if genac:
        rows.append(("critic engine (vLLM): always awake", {p: engine for p in everywhere}))  # train.py: the same flag
    for name, value in update_peak(actor, mb * seq, mb * args.response_tokens, args.gradient_checkpointing).items():
        rows.append((f"actor update: {name}", {"actor update": value}))
    if critic:
        critic_seq = seq + args.critic_new_tokens + 200 if genac else seq  # GenAC: ICC prompt (state + ~200 template) + answer
        critic_response = args.critic_new_tokens if genac else 0
        for name, value in update_peak(critic, mb * critic_seq, mb * critic_response, args.gradient_checkpointing).items():
            rows.append((f"critic update: {name}", {"critic update": value}))
    rows.append(("weight sync: 2 buckets + one bf16 layer", {"sync": 2 * args.sync_bucket_mb * 2 ** 20 + 2 * actor.layer}))
    if "prior embedder" in parts:
        rows.append(("V0.5 prior embedder (fp32)", {p: 4 * EMBEDDER_PARAMETERS for p in everywhere}))
    if "hidden states" in parts:
        rows.append(("POISE: one layer's hidden states of a micro-batch (no-grad pass)", {"actor update": 2 * mb * seq * actor.hidden}))
    rows.append(("CUDA context, NCCL, allocator slack", {p: CONTEXT_GB * GB for p in everywhere}))
    weights_gb = 2 * actor.parameters / GB
    facts = {"actor": actor, "critic": critic, "phases": phases, "gpu": gpu,
             "engine_weights_gb": weights_gb, "engine_kv_gb": args.gpu_memory_utilization * args.gpu_gb - weights_gb - 1.0,
             "host_gb_per_rank": 2 * actor.parameters / GB + 4 * max(actor.parameters, critic.parameters if critic else 0) / GB}
    return rows, facts


def render(rows, facts, args) -> str:
    phases, gpu = facts["phases"], facts["gpu"]
    fmt = lambda b: f"{b / GB:.1f}" if b else "-"  # noqa: E731
    out = [f"| per GPU, GB ({args.world} x {args.gpu_gb:g} GB, --algo {args.algo}) | " + " | ".join(phases) + " |",
           "|---|" + "---|" * len(phases)]
    out += [f"| {name} | " + " | ".join(fmt(cells.get(p, 0.0)) for p in phases) + " |" for name, cells in rows]
    totals = {p: sum(cells.get(p, 0.0) for _, cells in rows) for p in phases}
    out.append("| **total** | " + " | ".join(f"**{totals[p] / GB:.1f}**" for p in phases) + " |")
    out.append("| free | " + " | ".join(f"{(gpu - totals[p]) / GB:.1f}" for p in phases) + " |")
    a, c = facts["actor"], facts["critic"]
    notes = [f"actor: {a.parameters / 1e9:.2f}B parameters ({a.layers} layers, hidden {a.hidden}, vocab {a.vocab})"
             + (f"; critic: {c.parameters / 1e9:.2f}B" if c else ""),
             f"{'each' if 'generative critic' in PARTS[args.algo] else 'actor'} engine: {args.gpu_memory_utilization:g} x {args.gpu_gb:g} GB "
             f"= {args.gpu_memory_utilization * args.gpu_gb:.1f} GB "
             f"= {facts['engine_weights_gb']:.1f} GB bf16 weights + ~1 GB activations + {facts['engine_kv_gb']:.1f} GB KV cache"
             + ("" if facts["engine_kv_gb"] > 0 else "  <- NO ROOM FOR KV CACHE: raise --gpu-memory-utilization"),
             f"host RAM per rank: {facts['host_gb_per_rank']:.0f} GB (the sleeping engine's weights + a one-time fp32 copy of the "
             "largest model while it loads, before FSDP2 shards it)"]
    worst = max(phases, key=lambda p: totals[p])
    verdict = (f"fits: the fullest phase ({worst}) leaves {(gpu - totals[worst]) / GB:.1f} GB" if totals[worst] <= gpu else
               f"DOES NOT FIT: {worst} needs {totals[worst] / GB:.1f} GB. Levers: --gradient-checkpointing, a smaller "
               "--micro-batch-size, a lower --gpu-memory-utilization, more GPUs (--world)")
    return "\n".join(out + [""] + notes + [verdict])


def memory_main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="eval.py memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--model", required=True, help="the actor's config.json or model folder (only the config is read)")
    a("--critic", default=None, help="the critic's config (GenAC, PPO; default: --model)")
    a("--algo", default="grpo", choices=tuple(PARTS))
    a("--world", type=int, default=8, help="GPUs the models are sharded over (torchrun ranks)")
    a("--gpu-gb", type=float, default=80.0)
    a("--gpu-memory-utilization", type=float, default=0.3, help="each engine's share of the GPU (train.py's flag; GenAC's "
      "critic engine takes the same)")
    a("--prompt-tokens", type=int, default=512, help="train.py --max-prompt-tokens")
    a("--response-tokens", type=int, default=2048, help="train.py --max-new-tokens")
    a("--critic-new-tokens", type=int, default=1024, help="GenAC --critic-max-new-tokens")
    a("--micro-batch-size", type=int, default=4, help="rollouts per forward/backward (train.py's flag)")
    a("--gradient-checkpointing", action="store_true")
    a("--sync-bucket-mb", type=float, default=SYNC_BUCKET_MB)
    args = ap.parse_args(argv)
    try:
        rows, facts = plan(args)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(render(rows, facts, args))
