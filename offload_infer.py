"""
offload_infer.py: decode a MoE model whose routed experts stay on disk, holding only `--cache`
experts per MoE layer in preallocated slots.

What it teaches: an offloaded decode step, written out layer by layer. Everything except the
routed experts (embeddings, attention, norms, routers, shared experts, dense layers, head) is
loaded once and stays resident. Each MoE layer owns fixed tensors of `capacity` expert slots; per
token it does: route (the gate picks K experts), look up the cache (cache.py's ExpertCache),
load the misses from the safetensors files into the slots of evicted experts (cache.py's
ExpertStore), compute (SwiGLU with the slot weights), record (hits, misses, bytes, routing). Memory
is fixed before the first token: nothing is allocated per token for experts, and with mmap the
file pages of an expert are dropped once its slot holds it. The prompt is one batched step: each
expert any prompt token chose is loaded once per layer (streaming through the slots when they do
not all fit) and run on all of its tokens; the decode figures (hit rate, loads and MB per token)
count the one-token steps after it. The recorded routing replayed by cache.simulate gives the
same hits and misses, step by step (tests/test_offload.py checks it).

On CUDA the slots live on the GPU; a miss is read into a pinned host buffer and copied on a
dedicated stream, with one event per slot saying "loaded" (compute waits for it) and one saying
"no longer read" (the next load into that slot waits for it), so compute waits only for the
experts it needs. `--prefetch` also loads the next MoE layer's likely experts (its gate applied to
the current hidden state) while this layer computes. On CPU the same code runs without streams,
in float32.

Optional cache-aware routing (`--cache-bias B`, off by default) adds B to the router scores of
cached experts before the top-k, trading a little quality for fewer misses at inference time,
without training; ReMoE instead teaches the router itself to prefer recently used experts.

Follows: Eliseev & Mazur 2023 (mixtral-offloading: per-layer LRU expert cache, pinned buffers and
a copy stream) and llama.cpp (mmap'd weights). Leaves out: batching several sequences, speculative
expert loading beyond one layer ahead, quantized compute, and multi-GPU.

    python offload_infer.py --prompt "def main():" --max-new-tokens 40               # CPU or GPU, cache 8
    python offload_infer.py --cache 4 --policy lfu --io direct --json runs/decode.json
    python offload_infer.py --bench --bench-caches 2 4 8 16 --bench-tokens 32         # time vs I/O bound

Shapes: T tokens in the step, D hidden, E routed experts, K top-k, F expert width, C slots per layer.
"""

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import model
from cache import ExpertCache, ExpertStore, needed_experts, read_bandwidth, step_protect

DEFAULT_MODELS = ("runs/default/remoe", "runs/default/base")  # the fine-tuned model when train.py made one


def default_model_dir():
    return next((p for p in DEFAULT_MODELS if Path(p).is_dir()), DEFAULT_MODELS[-1])


class OffloadError(ValueError):
    """Bad input to the engine; the message is one line saying what was expected."""


@dataclass
class OffloadConfig:
    cache: int = 8             # experts per MoE layer held in slots
    policy: str = "lru"        # eviction policy: "lru" or "lfu" (Belady needs the future: traces only)
    io: str = "mmap"           # "mmap" or "direct" (O_DIRECT)
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None   # None: float32 on CPU; on CUDA the experts' 16-bit dtype on disk, else float32
    cache_bias: float = 0.0    # bonus added to cached experts' router scores before top-k (0: plain routing)
    prefetch: bool = False     # load the next MoE layer's predicted experts while this layer computes


# ----------------------------------------------------------------------------------------------
# Decisions made once: device, dtype, and the checks on user input

def pick_device(requested=None):
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise OffloadError(f"--device must be cpu, cuda or cuda:N, got {requested!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise OffloadError(f"--device {requested} requested but no CUDA device is available")
        if device.type not in ("cpu", "cuda"):
            raise OffloadError(f"--device must be cpu, cuda or cuda:N, got {requested!r}")
        return device, "requested with --device"
    if torch.cuda.is_available():
        return torch.device("cuda"), "a CUDA device is available"
    return torch.device("cpu"), "no CUDA device is available"


def pick_dtype(device, store, requested=None):
    if requested:
        return getattr(torch, requested), "requested with --dtype"
    if device.type == "cpu":
        return torch.float32, "the CPU path computes in float32; 16-bit and FP8 experts are converted when loaded"
    on_disk = store.parts[next(iter(store.parts))][0][0].dtype
    if on_disk in (torch.bfloat16, torch.float16):
        return on_disk, f"the experts are stored in {str(on_disk).removeprefix('torch.')}"
    if on_disk in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.bfloat16, "FP8 experts are dequantized to bfloat16"
    return torch.float32, "the experts are stored in float32"


def check_cache_size(cfg, capacity):
    if not cfg.moe_layers or cfg.n_routed_experts == 0:
        raise OffloadError(f"{cfg.model_type} config has no MoE layers: nothing to offload")
    if not 1 <= capacity <= cfg.n_routed_experts:
        raise OffloadError(f"--cache must be between 1 and the number of routed experts "
                           f"({cfg.n_routed_experts}), got {capacity}")


def check_prompt(cfg, n_prompt, max_new_tokens):
    ctx = cfg.max_position_embeddings
    if n_prompt == 0:
        raise OffloadError("the prompt is empty")
    if n_prompt > ctx:
        raise OffloadError(f"the prompt is {n_prompt} tokens, longer than the model's context of {ctx} "
                           f"(max_position_embeddings)")
    if max_new_tokens < 1:
        raise OffloadError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if n_prompt + max_new_tokens > ctx:
        raise OffloadError(f"the prompt ({n_prompt} tokens) plus --max-new-tokens {max_new_tokens} exceeds the "
                           f"model's context of {ctx} (max_position_embeddings)")


# ----------------------------------------------------------------------------------------------
# Routing with a bonus for cached experts: model.Gate.forward's selection with one extra term

def route(gate, x, bonus=None):
    """moe.gate(x) -> (indices (T, K), weights (T, K), scores (T, E)), with `bonus` (E,) added to the
    selection scores before the top-k (after DeepSeek-V3's correction bias, before group limiting,
    so a cached expert's group is favoured too). The weights stay the unbiased scores of the chosen
    experts, as the architecture computes them. bonus=None is exactly moe.gate."""
    return gate(x, bonus)


# ----------------------------------------------------------------------------------------------
# Slots: the cache's memory, allocated once

class ExpertSlots:
    """Weights of `capacity` experts of one MoE layer; slot s holds whichever expert the cache put there."""

    def __init__(self, capacity, D, F_, dtype, device):
        self.gate = torch.zeros(capacity, F_, D, dtype=dtype, device=device)  # (C, F, D)
        self.up = torch.zeros(capacity, F_, D, dtype=dtype, device=device)    # (C, F, D)
        self.down = torch.zeros(capacity, D, F_, dtype=dtype, device=device)  # (C, D, F)
        cuda = torch.device(device).type == "cuda"
        # per slot: "loaded" (recorded on the copy stream) and "no longer read" (on the compute stream)
        self.ready = [torch.cuda.Event() for _ in range(capacity)] if cuda else None
        self.free = [torch.cuda.Event() for _ in range(capacity)] if cuda else None

    def views(self, s):
        return self.gate[s], self.up[s], self.down[s]  # (F, D), (F, D), (D, F)

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))


def swiglu(x, gate, up, down):
    """One expert on its tokens x (n, D) -> (n, D): down @ (silu(gate @ x) * (up @ x)), as model.MLP."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def rss_bytes():
    """This process's resident set size now (Linux), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class DecodeReport:
    prompt_ids: list
    generated_ids: list
    ttft_s: float               # prefill + first token
    time_per_token_s: float     # per decode step after the first token
    tokens_per_s: float         # decode steps per second
    hit_rate: float             # over decode steps
    loads_per_token: float      # experts read per decode step, all MoE layers together
    mb_read_per_token: float
    prefill_loads: int
    prefill_mb: float
    prefetch_loads: int
    expert_memory_mb: float     # slots + staging buffers: allocated once, so also the peak
    peak_rss_mb: float | None   # sampled after every step


# ----------------------------------------------------------------------------------------------
# The engine

class OffloadEngine:
    def __init__(self, path, opts=None):
        self.opts = opts = opts or OffloadConfig()
        self.path = Path(path)
        cfg = self.cfg = model.read_config(self.path)
        check_cache_size(cfg, opts.cache)
        if opts.policy not in ("lru", "lfu"):
            raise OffloadError(f"--policy must be lru or lfu, got {opts.policy!r} (belady needs the future: "
                               f"use cache.simulate on a trace)")
        self.store = ExpertStore(self.path, cfg, opts.io)
        self.device, self.device_reason = pick_device(opts.device)
        self.dtype, self.dtype_reason = pick_dtype(self.device, self.store, opts.dtype)
        self.model = model.load_model(self.path, self.device, self.dtype, experts_on_disk=True)
        self.store.drop_page_cache()  # a miss must be a read, even right after the checkpoint was written
        D, F_ = cfg.hidden_size, cfg.moe_intermediate_size
        self.slots = {l: ExpertSlots(opts.cache, D, F_, self.dtype, self.device) for l in cfg.moe_layers}
        self.moe_layers = list(cfg.moe_layers)
        self.copy_stream, self.staging, self.staging_done = None, [], []
        if self.device.type == "cuda":
            self.copy_stream = torch.cuda.Stream(self.device)
            # two pinned host buffers, so reading the next expert from disk overlaps the previous copy
            for _ in range(2):
                self.staging.append(tuple(torch.empty(s, dtype=self.dtype, pin_memory=True)
                                          for s in ((F_, D), (F_, D), (D, F_))))
                self.staging_done.append(torch.cuda.Event())
            self.staging_turn = 0
        self.reset_cache()
        self.reset_stats()

    @property
    def expert_memory_bytes(self):
        staging = sum(t.numel() * t.element_size() for buf in self.staging for t in buf)
        direct = len(self.store.buffer) if self.store.buffer is not None else 0
        return sum(s.nbytes for s in self.slots.values()) + staging + direct

    @property
    def weight_bytes(self):
        """The resident (non-expert) weights, counted once even where tied."""
        seen = {p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}
        return sum(seen.values())

    def reset_cache(self):
        self.caches = {l: ExpertCache(self.opts.cache, self.opts.policy) for l in self.moe_layers}

    def reset_stats(self):
        self.trace = []     # per step, per MoE layer: [[K ids] per token] (cache.simulate's format)
        self.hits = []      # per step, per MoE layer
        self.misses = []
        self.step_bytes = []
        self.prefetch_loads = 0
        self.max_cached = 0  # the most experts any layer's cache held at once

    def close(self):
        self.store.close()

    # -- the decode step --------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, ids, kv):
        """ids (1, T) -> logits (1, T, V): one step (a prefill when T > 1), layer by layer."""
        m, T, D = self.model, ids.shape[1], self.cfg.hidden_size
        bytes_before = self.store.bytes_read
        record = ([], [], [])  # this step's routing, hits, misses: one entry per MoE layer
        cos, sin = m.rope(kv.length, T, self.device)
        x = m.model.embed_tokens(ids)  # (1, T, D)
        blocks = m.model.layers
        for i, block in enumerate(blocks):
            x = x + block.self_attn(block.input_layernorm(x), cos, sin, kv)
            h = block.post_attention_layernorm(x)  # (1, T, D)
            if isinstance(block.mlp, model.MoE):
                nxt = next((b.mlp for b in blocks[i + 1:] if isinstance(b.mlp, model.MoE)), None)
                x = x + self.moe(block.mlp, h.view(T, D), record, nxt).view(1, T, D)
            else:
                x = x + block.mlp(h)
        kv.length += T
        routing, hits, misses = record
        self.trace.append(routing)
        self.hits.append(hits)
        self.misses.append(misses)
        self.step_bytes.append(self.store.bytes_read - bytes_before)
        return m.lm_head(m.model.norm(x))

    def moe(self, moe, flat, record, next_moe=None):
        """One MoE layer on flat (T, D): route, look up the cache, load the misses, compute, and
        append to `record` (routing, hits, misses) for this layer."""
        layer, cache = moe.layer, self.caches[moe.layer]
        # route
        indices, weights, _ = route(moe.gate, flat, self._bonus(layer))  # (T, K), (T, K)
        ids = indices.tolist()
        needed = needed_experts(ids)
        protect = step_protect(needed, cache.capacity)
        # look up, load, compute: one expert at a time, so that below K slots each is used before it is evicted
        outs, hits = {}, 0
        for e in needed:
            a = cache.access(e, protect)
            hits += a.hit
            if not a.hit:
                self._load(layer, e, a.slot)
            token, k = torch.where(indices == e)  # the tokens that chose e, and in which of their K places
            outs[e] = token, self._expert(layer, a.slot, flat[token]) * weights[token, k, None]  # (n_e, D)
        self.max_cached = max(self.max_cached, len(cache.slot_of))
        if next_moe is not None and self.opts.prefetch and flat.shape[0] == 1:  # decode steps only
            self._prefetch(next_moe, flat)
        # combine in ascending expert id, as model.run_experts does, so that the sums round identically
        y = torch.zeros_like(flat)
        for e in sorted(outs):
            token, out = outs[e]
            y.index_add_(0, token, out.to(flat.dtype))
        # record
        routing, step_hits, step_misses = record
        routing.append(ids)
        step_hits.append(hits)
        step_misses.append(len(needed) - hits)
        return y + moe.shared(flat)

    def _bonus(self, layer):
        """(E,) cache_bias on the experts cached in `layer` now, or None for plain routing."""
        if not self.opts.cache_bias:
            return None
        bonus = torch.zeros(self.cfg.n_routed_experts, device=self.device)
        bonus[list(self.caches[layer].slot_of)] = self.opts.cache_bias
        return bonus

    def _load(self, layer, expert, slot):
        """Read one expert from disk into `slot`: directly on CPU; on CUDA through a pinned buffer and
        the copy stream, after the slot's previous expert has finished computing."""
        slots = self.slots[layer]
        if self.copy_stream is None:
            self.store.read_into(layer, expert, slots.views(slot))
            return
        i = self.staging_turn
        self.staging_turn = (i + 1) % len(self.staging)
        self.staging_done[i].synchronize()  # the last copy out of this buffer is done
        self.store.read_into(layer, expert, self.staging[i])
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(slots.free[slot])
            for dst, src in zip(slots.views(slot), self.staging[i]):
                dst.copy_(src, non_blocking=True)
            slots.ready[slot].record(self.copy_stream)
            self.staging_done[i].record(self.copy_stream)

    def _expert(self, layer, slot, x):
        slots = self.slots[layer]
        if slots.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(slots.ready[slot])  # wait for this expert only
        y = swiglu(x, *slots.views(slot))
        if slots.free is not None:
            slots.free[slot].record()  # after every kernel that reads the slot has been queued
        return y

    def _prefetch(self, next_moe, flat):
        """Load the experts next_moe's gate would pick for this layer's input: a guess (the next layer
        sees a later hidden state), so it can load experts that go unused. Not counted as requests."""
        layer, cache = next_moe.layer, self.caches[next_moe.layer]
        guess = needed_experts(route(next_moe.gate, flat, self._bonus(layer))[0].tolist())
        protect = step_protect(guess, cache.capacity)
        for e in guess:
            if e not in cache.slot_of:
                self._load(layer, e, cache.access(e, protect, use=False).slot)
                self.prefetch_loads += 1

    def preload_all(self):
        """Fill every slot, for the all-resident reference (needs cache == number of experts)."""
        for layer in self.moe_layers:
            for e in range(min(self.opts.cache, self.cfg.n_routed_experts)):
                a = self.caches[layer].access(e, use=False)
                if not a.hit:
                    self._load(layer, e, a.slot)
        self.synchronize()

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, generator=None, on_token=None):
        """Prefill, then decode one token at a time, as model.generate. Returns (ids (1, T+new), DecodeReport)."""
        ids = torch.as_tensor(prompt_ids, device=self.device).view(1, -1)
        first_step, kv, peak_rss = len(self.trace), model.KVCache(), rss_bytes()
        self.synchronize()
        t0 = time.perf_counter()
        logits = self.forward(ids, kv)[:, -1]
        tokens = []
        for i in range(max_new_tokens):
            nxt = model.sample_next(logits, temperature, top_p, generator)  # (1, 1)
            tokens.append(nxt.item())  # the host needs the id anyway: this is also the step's sync
            if i == 0:
                t_first = time.perf_counter()
            if on_token is not None:
                on_token(tokens[-1])
            if i + 1 < max_new_tokens:
                logits = self.forward(nxt, kv)[:, -1]
            rss = rss_bytes()
            peak_rss = max(peak_rss, rss) if rss is not None and peak_rss is not None else None
        self.synchronize()
        t_end = time.perf_counter()
        steps = max_new_tokens - 1  # decode steps after the prefill
        dec = slice(first_step + 1, len(self.trace))
        hits = sum(map(sum, self.hits[dec]))
        misses = sum(map(sum, self.misses[dec]))
        report = DecodeReport(
            prompt_ids=ids[0].tolist(), generated_ids=tokens, ttft_s=t_first - t0,
            time_per_token_s=(t_end - t_first) / steps if steps else float("nan"),
            tokens_per_s=steps / (t_end - t_first) if steps else float("nan"),
            hit_rate=hits / (hits + misses) if hits + misses else float("nan"),
            loads_per_token=misses / steps if steps else float("nan"),
            mb_read_per_token=sum(self.step_bytes[dec]) / 1e6 / steps if steps else float("nan"),
            prefill_loads=sum(self.misses[first_step]), prefill_mb=self.step_bytes[first_step] / 1e6,
            prefetch_loads=self.prefetch_loads, expert_memory_mb=self.expert_memory_bytes / 1e6,
            peak_rss_mb=peak_rss / 1e6 if peak_rss is not None else None)
        out = torch.cat([ids, torch.tensor([tokens], device=self.device)], dim=1)
        return out, report


# ----------------------------------------------------------------------------------------------
# Benchmark: time per token for several cache sizes next to the I/O bound it should approach

def bench(path, prompt_ids, new_tokens, caches, opts=None, repeats=3, log=print):
    """For each cache size, with --io direct: measured time per token, and the bound
    resident time per token + bytes missed per token / measured O_DIRECT bandwidth, and their ratio;
    plus peak RSS while decoding vs resident weights + cache slots + fixed overhead (the process's
    RSS just before that engine was built: interpreter, torch, its kernels, allocator leftovers).
    Every timed run starts from an empty cache, so repeats do identical work; the fastest of
    `repeats` is kept, since on a shared machine noise only ever adds time."""
    opts = opts or OffloadConfig()
    cfg = model.read_config(path)
    with ExpertStore(path, cfg, "direct") as store:
        if store.fallback:
            log(f"note: {store.fallback}")
        experts = list(store.parts)
        bandwidth = max(read_bandwidth(store, experts) for _ in range(repeats))
    log(f"disk: {bandwidth / 1e6:.1f} MB/s reading {store.expert_bytes / 1e6:.3f} MB experts one at a time "
        f"({'O_DIRECT' if not store.fallback else 'mmap, O_DIRECT unavailable'})")

    def timed(capacity, resident=False):
        gc.collect()
        overhead = rss_bytes() or 0
        engine = OffloadEngine(path, replace(opts, cache=capacity, io="direct"))
        if resident:
            engine.preload_all()
        engine.generate(prompt_ids, 2)  # warm-up: allocator, kernels, code paths
        best = None
        for _ in range(repeats):
            if not resident:
                engine.reset_cache()
                engine.store.drop_page_cache()
            engine.reset_stats()
            r = engine.generate(prompt_ids, new_tokens)[1]
            best = r if best is None or r.time_per_token_s < best.time_per_token_s else best
        sizes = engine.weight_bytes, engine.expert_memory_bytes, overhead
        engine.close()
        return best, sizes

    resident = timed(cfg.n_routed_experts, resident=True)[0].time_per_token_s
    log(f"resident (all {cfg.n_routed_experts} experts in slots, same code): {resident * 1e3:.2f} ms/token")
    log(f"{'cache':>5s} {'ms/token':>9s} {'bound ms':>9s} {'ratio':>6s} {'MB/token':>9s} {'hit rate':>8s}   "
        f"peak RSS MB vs weights + slots + overhead")
    rows = []
    for c in caches:
        r, (weights, slots, overhead) = timed(c)
        bound = resident + r.mb_read_per_token * 1e6 / bandwidth
        expected = (weights + slots + overhead) / 1e6
        rows.append(dict(cache=c, time_per_token_s=r.time_per_token_s, bound_s=bound,
                         ratio=r.time_per_token_s / bound, mb_read_per_token=r.mb_read_per_token,
                         hit_rate=r.hit_rate, peak_rss_mb=r.peak_rss_mb, weights_mb=weights / 1e6,
                         slots_mb=slots / 1e6, overhead_mb=overhead / 1e6))
        rss = f"{r.peak_rss_mb:8.1f}" if r.peak_rss_mb is not None else "     n/a"
        log(f"{c:5d} {r.time_per_token_s * 1e3:9.2f} {bound * 1e3:9.2f} {r.time_per_token_s / bound:6.2f} "
            f"{r.mb_read_per_token:9.3f} {r.hit_rate:8.3f}   {rss} vs {weights / 1e6:.1f} + {slots / 1e6:.1f} + "
            f"{overhead / 1e6:.1f} = {expected:.1f}")
    return dict(bandwidth_bytes_per_s=bandwidth, resident_time_per_token_s=resident, repeats=repeats, rows=rows)


# ----------------------------------------------------------------------------------------------
# Command line

def write_json(path, obj):
    """Write atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class TextStream:
    """Prints generated text as it comes, holding back a token that ends inside a UTF-8 character."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], 0

    def __call__(self, token):
        self.ids.append(token)
        if self.tok is None:
            print(f" {token}", end="", flush=True)
            return
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[self.shown:], end="", flush=True)
            self.shown = len(text)


def parse_args(argv=None):
    d = OffloadConfig()
    p = argparse.ArgumentParser(description="Decode with routed experts on disk and an expert cache per MoE layer.")
    g = p.add_argument_group("model and prompt")
    g.add_argument("--model", default=None, help=f"checkpoint folder (default: {DEFAULT_MODELS[0]} if it exists, "
                                                 f"else {DEFAULT_MODELS[1]})")
    g.add_argument("--prompt", default="def main():", help="text to continue (needs tokenizer.json in the folder)")
    g.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt "
                                                      "(for checkpoints without a tokenizer)")
    g.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when --temperature > 0")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g = p.add_argument_group("expert cache")
    g.add_argument("--cache", type=int, default=d.cache, help="experts per MoE layer held in memory")
    g.add_argument("--policy", choices=("lru", "lfu"), default=d.policy, help="eviction policy")
    g.add_argument("--io", choices=("mmap", "direct"), default=d.io, help="mmap (as llama.cpp) or O_DIRECT reads")
    g.add_argument("--cache-bias", type=float, default=d.cache_bias,
                   help="bonus on cached experts' router scores before top-k (0 = plain routing)")
    g.add_argument("--prefetch", action="store_true", help="load the next MoE layer's predicted experts early")
    g = p.add_argument_group("device")
    g.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=d.dtype,
                   help="compute dtype (default: float32 on CPU; on CUDA the experts' 16-bit dtype, else float32)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default); small "
                                                          "models on a busy machine often decode faster with 1")
    g = p.add_argument_group("output and benchmark")
    g.add_argument("--json", default=None, help="write the figures and the prompt's and generated token ids here")
    g.add_argument("--bench", action="store_true", help="time per token for several cache sizes vs the I/O bound")
    g.add_argument("--bench-caches", type=int, nargs="+", default=[2, 4, 8, 16], help="cache sizes for --bench")
    g.add_argument("--bench-tokens", type=int, default=32, help="tokens decoded per timed run in --bench")
    return p.parse_args(argv)


def prompt_token_ids(args, tok):
    if args.prompt_ids is not None:
        try:
            return [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise OffloadError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    if tok is None:
        raise OffloadError(f"{args.model}: no tokenizer.json to encode --prompt; pass --prompt-ids instead")
    return tok.encode(args.prompt).ids


def main(argv=None):
    args = parse_args(argv)
    args.model = args.model or default_model_dir()
    opts = OffloadConfig(cache=args.cache, policy=args.policy, io=args.io, device=args.device, dtype=args.dtype,
                         cache_bias=args.cache_bias, prefetch=args.prefetch)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        # every check on user input comes before the (slow) load
        cfg = model.read_config(args.model)
        check_cache_size(cfg, args.cache)
        for c in args.bench_caches if args.bench else []:
            check_cache_size(cfg, c)
        tok = model.load_tokenizer(args.model)
        prompt = prompt_token_ids(args, tok)
        if any(not 0 <= t < cfg.vocab_size for t in prompt):
            raise OffloadError(f"--prompt-ids must be in 0..{cfg.vocab_size - 1}")
        check_prompt(cfg, len(prompt), args.bench_tokens if args.bench else args.max_new_tokens)
        if not 0 < args.top_p <= 1 or args.temperature < 0:
            raise OffloadError("--top-p must be in (0, 1] and --temperature >= 0")
        if args.bench:
            result = bench(args.model, prompt, args.bench_tokens, args.bench_caches, opts)
            if args.json:
                write_json(args.json, dict(model=str(args.model), prompt_ids=prompt, **result))
            return
        engine = OffloadEngine(args.model, opts)
    except (model.UserError, OffloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    dtype = str(engine.dtype).removeprefix("torch.")
    print(f"device: {engine.device} ({engine.device_reason}); dtype: {dtype} ({engine.dtype_reason}); "
          f"{torch.get_num_threads()} CPU threads", file=sys.stderr)
    if engine.store.fallback:
        print(f"note: {engine.store.fallback}", file=sys.stderr)
    print(f"{args.model}: {cfg.model_type}, {len(cfg.moe_layers)} MoE layers x {cfg.n_routed_experts} experts "
          f"(top-{cfg.num_experts_per_tok}), cache {args.cache}/layer, {args.policy}, io {engine.store.io}",
          file=sys.stderr)
    print(tok.decode(prompt) if tok is not None else " ".join(map(str, prompt)), end="", flush=True)
    gen = torch.Generator(device=engine.device).manual_seed(args.seed)
    _, r = engine.generate(prompt, args.max_new_tokens, args.temperature, args.top_p, gen, TextStream(tok))
    engine.close()
    print()
    print(f"time to first token {r.ttft_s * 1e3:.1f} ms | {r.time_per_token_s * 1e3:.2f} ms/token | "
          f"{r.tokens_per_s:.1f} tokens/s")
    print(f"hit rate {r.hit_rate:.3f} | {r.loads_per_token:.2f} expert loads/token | "
          f"{r.mb_read_per_token:.3f} MB read/token | peak resident expert memory {r.expert_memory_mb:.2f} MB"
          + (f" | peak RSS {r.peak_rss_mb:.0f} MB" if r.peak_rss_mb is not None else ""))
    if args.json:
        figures = dict(model=str(args.model), **asdict(opts), **asdict(r))
        figures.update(device=str(engine.device), dtype=dtype, threads=torch.get_num_threads())
        write_json(args.json, figures)


if __name__ == "__main__":
    main()
