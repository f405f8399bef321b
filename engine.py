"""The generation engines: vLLM in-process (one sleep-capable engine per process) or Hugging Face `generate`.

`serve` puts a set of weights on an engine (wake, load, then the KV cache) and `serving` does so for a block and
lets the engine sleep after it: the one place where the loop and the algorithms swap, wake and sleep weights.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------------
# A quiet console: third-party lines that say nothing to a user of this project, dropped at their source


# vLLM warnings that describe the CPU build or settings this project chose on purpose (eager mode, an in-process
# engine, no Triton / tcmalloc / iomp on a CPU, the CPU worker refusing torch.set_num_threads):
# {logger: how each message starts}
VLLM_EXPECTED_WARNINGS = {
    "vllm.engine.arg_utils": ("The global random seed is set to",),
    "vllm.config.vllm": ("Enforce eager set", "Inductor compilation was disabled", "Model Runner V2 requires Triton"),
    "vllm.platforms.cpu": ("Triton is not installed", "Reset SSM cache type"),
    "vllm.v1.worker.cpu_worker": ("libtcmalloc is not found", "libiomp is not found",
                                  "CPU backend doesn't allow to use `torch.set_num_threads`"),
}


def quiet_third_party_output() -> None:
    """Drop the start-up lines of vLLM, torch and transformers that are expected on this project's settings. Only named
    warnings go (VLLM_EXPECTED_WARNINGS, filtered on the logger that emits them, which survives vLLM re-configuring its
    handlers; torch's reduce_op deprecation inside vLLM; torch's "Triton not available") and the weight-loading progress
    bars; every error and any other warning still shows. The entry points also set TORCH_CPP_LOG_LEVEL=ERROR before
    importing torch (C++ warnings such as the vLLM-CPU worker's NUMA binding note)."""
    import warnings
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated", category=FutureWarning)
    logging.getLogger("torch._library.triton").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    for name, starts in VLLM_EXPECTED_WARNINGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


# ----------------------------------------------------------------------------------------------
# Generation engines


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]  # engine log-prob of each sampled token (temperature 1 unless said otherwise)
    text: str
    finish_reason: str  # "stop" | "length"


class VLLMEngine:
    """An in-process vLLM engine per training rank (TRL's colocate mode), with weight sync and sleep mode.

    ONE sleep-capable engine per process: vLLM's CuMemAllocator (sleep mode) asserts a single instance and its
    workspace manager is process-global, so a second sleep-capable engine is refused (`_claim_sleep_mode`). A second
    model of the same architecture (GenAC's critic) is served by THIS engine with its weights swapped in
    (`serving(engine, weights, holder="critic")`); `holder` says whose weights it holds now. verl and OpenRLHF run a
    second model's engine in its own process instead (weights over IPC): one engine means no second KV cache, no
    second CUDA context, and a critic that holds no GPU memory while the actor trains.

    Sleep (GPU): level 2 drops weights and KV cache (weights about to be replaced: the sync, the critic's swap);
    level 1 keeps the weights in pinned host memory (a warm-up step, where the actor does not change). Wake in
    order, as TRL and verl do: wake(["weights"]) -> load_weights -> wake(["kv_cache"]) (`serve`). On the CPU vLLM has
    no sleep mode: sleep/wake only keep the record (`asleep`), so the same calls run everywhere.

    CPU facts (measured on a 2-core host): in-process engine (V1 multiprocessing off), KV cache 2 GiB, eager mode.
    Per-request seeds are broken in the CPU sampler, so determinism comes from seeding torch's
    global RNG before each call (the in-process sampler draws from it).
    """

    supports_regex = True  # generate(..., regex=) constrains samples (vLLM structured outputs)
    TAGS = ("weights", "kv_cache")  # vLLM's sleep-mode tags (LLM.wake_up(tags=...))
    _sleep_capable_in_process = None  # the process's one sleep-capable engine (vLLM's CuMemAllocator is a singleton)

    def __init__(self, model_path: str, dtype: str = "bfloat16", seed: int = 0, max_model_len: int = 1024,
                 gpu_memory_utilization: float = 0.3, world_size: int = 1, sleep_mode: bool = True,
                 max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                 device_type: str | None = None):
        """device_type: where the engine runs, "cuda" or "cpu" (None: CUDA when this process has it); it decides sleep
        mode, CUDA graphs and the memory budget, never where a tensor happens to sit. sleep_mode (GPU): sleep() frees
        the engine's GPU memory; a second sleep-capable engine in the process is refused (RuntimeError).
        max_num_seqs / max_num_batched_tokens: None keeps vLLM's defaults (GPU >= 70 GB: 1024 / 16384, whose sampler
        peak vLLM's profiler reserves out of the KV cache; CPU: 256 / 4096); train.py passes the plan's (memory.py)."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        quiet_third_party_output()
        from vllm import LLM
        self.on_gpu = (device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
        self.sleeps = self.on_gpu and sleep_mode
        if self.sleeps:
            _claim_sleep_mode(VLLMEngine._sleep_capable_in_process, model_path)
        self.dtype = getattr(torch, dtype)
        self.model_path, self.holder, self.asleep, self.closed = model_path, "actor", set(), False
        kwargs = dict(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len, enable_prefix_caching=True,
                      enforce_eager=not self.on_gpu, logprobs_mode="processed_logprobs",  # log-probs after temperature
                      use_tqdm_on_load=False)
        limits = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens}
        kwargs.update({k: v for k, v in limits.items() if v is not None})
        if world_size > 1:  # each torchrun rank owns one engine over its own shard of prompts
            kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleeps)
        # Loading the fp32 master weights into a bf16 engine warns once per weight ("Attempted to load weight ...
        # float32 into parameter with dtype torch.bfloat16"): the cast is what --engine-dtype asked for. Drop exactly
        # that line.
        logging.getLogger("vllm.model_executor.models.utils").addFilter(
            lambda record: not ("Attempted to load weight" in record.getMessage()
                                and f"torch.float32 into parameter with dtype {self.dtype}" in record.getMessage()))
        self.llm = LLM(**kwargs)
        if self.sleeps:
            VLLMEngine._sleep_capable_in_process = self
        # Every weight reload warns "RotaryEmbedding: Failed to load weights": its cos/sin table is a buffer that no
        # checkpoint holds, and vLLM keeps its own. Drop that one line; other layers' failures still show.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            lambda record: not record.getMessage().startswith("RotaryEmbedding:"))

    def generate(self, prompt_ids: list[list[int]], n: int | list[int], max_tokens: int | list[int], temperature: float,
                 top_p: float, seed: int, regex: str | None = None) -> list[list[Sample]]:
        """-> samples[prompt][i]; `n` and `max_tokens` may differ per prompt (V0.5's extra rollouts, value states).
        `regex`: every sample is constrained to match it (vLLM structured outputs; GenAC's answer format)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams
        if self.asleep:
            raise RuntimeError(f"generate on an engine whose {sorted(self.asleep)} sleep: wake() it first")
        counts = [n] * len(prompt_ids) if isinstance(n, int) else list(n)
        limits = [max_tokens] * len(prompt_ids) if isinstance(max_tokens, int) else list(max_tokens)
        keep = [i for i, c in enumerate(counts) if c > 0]
        guide = StructuredOutputsParams(regex=regex) if regex else None
        params = [SamplingParams(n=counts[i], temperature=temperature, top_p=top_p, max_tokens=limits[i], logprobs=0,
                                 structured_outputs=guide) for i in keep]
        torch.manual_seed(seed)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids[i]) for i in keep], params,
                                    use_tqdm=False)
        self.cached_prompt_tokens = sum(out.num_cached_tokens or 0 for out in outputs)  # prefix-cache hits of this call
        result: list[list[Sample]] = [[] for _ in prompt_ids]
        for i, out in zip(keep, outputs):
            for c in out.outputs:
                logprobs = ([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)] if c.logprobs
                            else [0.0] * len(c.token_ids))
                result[i].append(Sample(list(c.token_ids), logprobs, c.text, c.finish_reason or "stop"))
        return result

    def load_weights(self, named_tensors, holder: str = "actor") -> None:
        """Push trainer weights in (cast to the engine dtype), then drop prefix-cache KV of the old weights (every swap:
        cached prompt KV of one model must never serve the other). holder: whose weights these are ("actor",
        "critic"). named_tensors: any iterable of (name, tensor), pulled one at a time (actor.stream_full_parameters
        gathers them a bucket at a time): vLLM's layerwise reload keeps a tensor only until its layer is complete."""
        if "weights" in self.asleep:
            raise RuntimeError("load_weights into sleeping weights: wake(['weights']) first")
        cast = ((k, v.to(self.dtype) if v.is_floating_point() else v) for k, v in named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=cast, is_checkpoint_format=True))
        if self.llm.reset_prefix_cache() is False:  # vLLM: False when requests still hold cached blocks
            raise RuntimeError("vLLM did not reset its prefix cache after a weight load (requests still running?): "
                               "cached KV of the old weights would serve the new ones; stopping")
        self.holder = holder

    def close(self) -> None:
        """Shut the in-process engine down now (its exit-time finalizer trips over torch.distributed); idempotent."""
        if self.closed:
            return
        self.closed = True
        if VLLMEngine._sleep_capable_in_process is self:
            VLLMEngine._sleep_capable_in_process = None
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass

    def sleep(self, level: int = 2) -> None:
        """Free the engine's GPU memory: level 2 (weights about to be replaced) drops weights and KV cache; level 1
        (weights stay: a warm-up step) drops the KV cache and keeps the weights in pinned host memory."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=level)
        self.asleep, self.level = set(self.TAGS), level

    def wake(self, tags: list[str] | None = None) -> None:
        """Map `tags` (None: all) back; TRL/verl order after level 2: ["weights"], load_weights, ["kv_cache"]."""
        tags = [t for t in (tags or self.TAGS) if t in self.asleep]
        if self.sleeps and tags:
            torch.cuda.empty_cache()  # the trainer's cached activation blocks back to the driver, for vLLM to map
            self.llm.wake_up(tags=tags)
        self.asleep -= set(tags)


def _claim_sleep_mode(existing, model_path: str) -> None:
    """Refuse a second sleep-capable vLLM engine in one process (vLLM's CuMemAllocator is one per process)."""
    if existing is not None and not existing.closed:
        raise RuntimeError(f"a second sleep-capable vLLM engine ({model_path}) in a process that has one "
                           f"({existing.model_path}): vLLM allows one per process. Serve a model of the same "
                           "architecture from that engine (load_weights(..., holder=...)), or build the second with "
                           "sleep_mode=False and plan its memory")


class HFEngine:
    """`--engine hf`: Hugging Face `generate` on its own copy of the weights (slower, no vLLM needed)."""

    supports_regex = False

    def __init__(self, model_path: str, dtype: str = "float32", seed: int = 0, **_):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.dtype = getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.pad = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                    else self.tokenizer.eos_token_id)
        self.holder, self.asleep = "actor", set()

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int | list[int], max_tokens: int | list[int], temperature: float,
                 top_p: float, seed: int, regex: str | None = None) -> list[list[Sample]]:
        if regex:
            raise ValueError("constrained (regex) generation needs the vLLM engine; "
                             "drop --engine hf or the guidance flag")
        counts = [n] * len(prompt_ids) if isinstance(n, int) else list(n)
        limits = [max_tokens] * len(prompt_ids) if isinstance(max_tokens, int) else list(max_tokens)
        eos = set(self.eos if isinstance(self.eos, list) else [self.eos])
        result: list[list[Sample]] = []
        for i, (ids, count) in enumerate(zip(prompt_ids, counts)):
            if count == 0:
                result.append([])
                continue
            torch.manual_seed(seed + i)  # one seed per prompt: independent of batching
            out = self.model.generate(torch.tensor([ids] * count),
                                      attention_mask=torch.ones(count, len(ids), dtype=torch.long),
                                      do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                      max_new_tokens=limits[i], output_scores=True, return_dict_in_generate=True,
                                      pad_token_id=self.pad)
            new = out.sequences[:, len(ids):]  # [count, L]
            # [count, L]
            logp = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            samples = []
            for row, lp in zip(new.tolist(), logp.tolist()):
                length = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
                finish = "stop" if length < len(row) or row[-1] in eos else "length"
                samples.append(Sample(row[:length], lp[:length],
                                      self.tokenizer.decode(row[:length], skip_special_tokens=True), finish))
            result.append(samples)
        return result

    @torch.no_grad()
    def load_weights(self, named_tensors, holder: str = "actor") -> None:
        """Copies each (name, tensor) into its weight as it arrives (a tied lm_head follows its embedding)."""
        own, self.holder = self.model.state_dict(), holder
        for name, tensor in named_tensors:
            if name not in own:
                raise KeyError(f"HFEngine.load_weights: the engine's model has no weight {name!r}")
            own[name].copy_(tensor)

    def close(self) -> None:
        pass

    def sleep(self, level: int = 2) -> None:
        pass  # its own copy of the weights stays (no sleep mode)

    def wake(self, tags: list[str] | None = None) -> None:
        pass


def make_engine(kind: str, model_path: str, **kwargs):
    """An engine of `kind` ('vllm' or 'hf') serving `model_path`; kwargs go to its constructor. The loop's engine is
    handed to the algorithm each step (rollout.Step.engine), so that one process runs one engine (see VLLMEngine)."""
    if kind == "vllm":
        try:
            import vllm  # noqa: F401
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"--engine vllm: vLLM does not import here ({e}); "
                               "install it or use --engine hf") from None
        engine = VLLMEngine(model_path, **kwargs)
    elif kind == "hf":
        engine = HFEngine(model_path, **kwargs)
    else:
        raise ValueError(f"unknown --engine {kind!r}; choose vllm or hf")
    return engine


def same_architecture(path_a: str, path_b: str) -> bool:
    """Do two model folders have the same architecture and tokenizer vocabulary (one engine can serve both by
    swapping weights)? Compares the config fields that shape the weights."""
    from transformers import AutoConfig, AutoTokenizer
    keys = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "rope_theta",
            "max_position_embeddings")
    if path_a == path_b:
        return True
    a, b = (AutoConfig.from_pretrained(p).to_dict() for p in (path_a, path_b))
    if any(a.get(k) != b.get(k) for k in keys):
        return False
    vocab_a, vocab_b = (AutoTokenizer.from_pretrained(p).get_vocab() for p in (path_a, path_b))
    return vocab_a == vocab_b


def default_engine() -> str:
    try:
        import vllm  # noqa: F401
        return "vllm"
    except Exception:  # noqa: BLE001
        return "hf"


# ----------------------------------------------------------------------------------------------
# Serving a set of weights: wake, load, sleep in one place


def serve(engine, weights, holder: str = "actor") -> None:
    """Put `weights` ((name, tensor) pairs, pulled one at a time: actor.stream_full_parameters) on the engine and leave
    it awake. TRL/verl's order after a level-2 sleep: wake(["weights"]) -> load_weights -> wake() (the KV cache is not
    mapped during the load). holder: whose weights these are ("actor", "critic"), kept in engine.holder."""
    engine.wake(["weights"])
    engine.load_weights(weights, holder=holder)
    engine.wake()


@contextmanager
def serving(engine, weights=None, holder: str = "actor", sleep_level: int = 2):
    """The engine awake for the block with `weights` loaded (None: those it holds), asleep after it: level 2 drops
    weights and KV cache (the next weights replace them), level 1 keeps the weights in host memory (they serve
    again)."""
    if weights is None:
        engine.wake()
    else:
        serve(engine, weights, holder)
    try:
        yield engine
    finally:
        engine.sleep(level=sleep_level)
