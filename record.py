"""
record.py: what an offloaded run counts. One `Step` per forward pass (a prefill or one decode token) holds
the routing, hits, misses and bytes read per MoE layer; a `Record` keeps them in order and sums any
stretch of them into `Totals`; `DecodeReport` is what one generation reports. offload_infer.py writes
them, bench.py reads them.
"""

import os
from collections import Counter
from dataclasses import dataclass, field

from cache import Counts


@dataclass
class Step:
    """One forward pass: a prefill (tokens > 1) or one decode token."""
    tokens: int
    routing: list = field(default_factory=list)  # per MoE layer: [[K ids] per token] (cache.simulate's format)
    hits: list = field(default_factory=list)     # per MoE layer: requested experts found in the cache
    misses: list = field(default_factory=list)   # per MoE layer: experts read from disk for the request
    agreement: list = field(default_factory=list)  # cache-aware routing, per MoE layer: model.routing_drift's
    kl: list = field(default_factory=list)         # agreement and KL, each the mean over the step's tokens
    layer_bytes: Counter = field(default_factory=Counter)  # MoE layer id -> bytes read from the files for it
    prefetched: int = 0                          # experts --prefetch loaded ahead (not requests)

    @property
    def bytes_read(self):
        """From the files, all MoE layers together, prefetches included."""
        return sum(self.layer_bytes.values())


@dataclass
class Totals(Counts):
    """The counts of some steps (hit rate and misses per token: cache.Counts), and what the files gave."""
    steps: int
    bytes_read: int
    prefetched: int
    agreement: float  # with the true top-k: the fraction of chosen (token, expert) pairs in it
    kl: float         # KL(true || used routing weights), mean over tokens and MoE layers (plain routing: 1 and 0)

    @property
    def mb_per_token(self):
        return self.bytes_read / 1e6 / self.tokens if self.tokens else float("nan")


@dataclass
class LayerTotals(Counts):
    """The counts of one MoE layer over some steps."""
    layer: int       # its index in the decoder
    bytes_read: int  # for this layer's misses and prefetches


class Record:
    """Every step's counts, in order. Callers read them through `totals` and `trace`."""

    def __init__(self):
        self.steps = []

    def totals(self, start=0, stop=None):
        steps = self.steps[start:stop]
        routed = [(s.tokens, a, kl) for s in steps for a, kl in zip(s.agreement, s.kl)]  # one per (step, layer)
        n = sum(t for t, _, _ in routed)
        return Totals(agreement=float(sum(t * a for t, a, _ in routed) / n) if n else 1.0,  # one read per run
                      kl=float(sum(t * kl for t, _, kl in routed) / n) if n else 0.0,
                      hits=sum(sum(s.hits) for s in steps), misses=sum(sum(s.misses) for s in steps),
                      tokens=sum(s.tokens for s in steps), steps=len(steps),
                      bytes_read=sum(s.bytes_read for s in steps), prefetched=sum(s.prefetched for s in steps))

    def per_layer(self, layers, start=0, stop=None):
        """Totals of each MoE layer over these steps; `layers`: their ids in decoder order (as Step's lists)."""
        steps = self.steps[start:stop]
        return [LayerTotals(hits=sum(s.hits[i] for s in steps), misses=sum(s.misses[i] for s in steps),
                            tokens=sum(s.tokens for s in steps), layer=layer,
                            bytes_read=sum(s.layer_bytes[layer] for s in steps)) for i, layer in enumerate(layers)]

    def trace(self, start=0, stop=None):
        """The routing of these steps as one sequence in cache.simulate's format: trace[s][l] = [[K ids] per token]."""
        return [s.routing for s in self.steps[start:stop]]


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
    peak_rss_mb: float | None   # before the first and after the last step (allocated up front; the KV cache grows)
    agreement: float            # cache-aware routing, over decode steps: chosen (token, expert) pairs in the true top-k
    kl: float                   # and the mean KL(true || used routing weights) per token and MoE layer
    per_layer: list = field(default_factory=list)  # LayerTotals of each MoE layer over the decode steps
    held_bytes: int = 0         # measured after the last step: every tensor the engine holds (budget.held_bytes)
