"""
latency.py: how long an offloaded decode token takes on a device, predicted before running there.

What it teaches: a token costs what it costs with every expert resident, plus, for each MoE layer, the
time to read that layer's misses of the token (and, where the slots live in device memory, to copy them
over the host-to-device link):

    time per token = resident time + sum over layers of read time(the layer's misses of the token)
                                   + misses x the compute time a read adds around it

The misses come from a routing trace replayed through the LRU simulator (cache.py), not from a decode
run, so the prediction can be checked against one. A device is a `Device`. This machine's figures are
measured as the engine pays them, by `ReadProbe`: an engine with every expert resident that, after each
layer, reads n random experts (n = 1 .. top-k) with the engine's own loader (O_DIRECT, several reads in
flight) and times them: its time per token less those reads, and the reads. Both are measured beside the
decode being predicted, since this disk's speed drifts by tens of percent from minute to minute. Other devices come from PROFILES: published bandwidths, each with its source.
Leaves out: prefetch, reads overlapping compute.
"""

import random
import time
from dataclasses import dataclass

import torch

import cache
import offload_infer as oi


@dataclass(frozen=True)
class Device:
    name: str
    read_bandwidth: float                      # bytes/s reading single experts in random order, one at a time
    host_to_device: float | None               # bytes/s copying an expert into a device slot; None: host memory
    source: str                                # where every figure comes from
    resident_s_per_token: float | None = None  # measured time per token with every expert resident, or
    memory_bandwidth: float | None = None      # bytes/s the device streams weights at: resident = active bytes / it
    in_flight_bandwidth: float | None = None   # bytes/s with several reads in flight, where known
    read_s: tuple | None = None                # measured: seconds to read a layer's n misses of a token, [n - 1]
    slowdown_s_per_read: float = 0.0           # measured: compute time each read adds around it (shared caches, threads)


GB = 1e9

# Named devices, from published figures (spec sheets and the like, not measured here). Their resident time is
# active weight bytes per token / memory bandwidth: weights streamed once, overheads (kernel launches, Python)
# left out, so it is a floor, far below the real time for a model as small as the default one.
PROFILES = (
    Device("Jetson Orin NX 16GB + PCIe 3.0 x4 NVMe", read_bandwidth=3.5 * GB, host_to_device=None,
           memory_bandwidth=102.4 * GB,
           source="memory bandwidth 102.4 GB/s: NVIDIA Jetson Orin NX 16GB module data sheet; storage 3.5 GB/s: "
                  "sequential read of a PCIe 3.0 x4 NVMe SSD (Samsung 970 EVO Plus spec sheet: 3,500 MB/s), an upper "
                  "figure for random single-expert reads; unified memory, so no host-to-device copy"),
    Device("desktop GPU (RTX 4090) over PCIe 4.0 x16 + PCIe 4.0 NVMe", read_bandwidth=7.45 * GB,
           host_to_device=25 * GB, memory_bandwidth=1008 * GB,
           source="memory bandwidth 1008 GB/s: NVIDIA GeForce RTX 4090 spec; host-to-device 25 GB/s: pinned copies "
                  "over PCIe 4.0 x16 as CUDA's bandwidthTest reports them on such systems (31.5 GB/s theoretical); "
                  "storage 7.45 GB/s: sequential read of a PCIe 4.0 NVMe SSD (Samsung 990 PRO spec sheet: 7,450 "
                  "MB/s), an upper figure for random single-expert reads"),
)


def this_machine(resident_s, read_s, slowdown_s=0.0, device="cpu"):
    """This machine, from the figures measured beside a decode (bench.decode): `resident_s` seconds per token
    with every expert resident, `read_s` a ReadProbe's mean seconds of a read of n = 1, 2, ... experts, and
    `slowdown_s` the compute time each read adds (the probed engine's time less its reads, against the
    resident engine's, per read)."""
    return Device("this machine", None, None, resident_s_per_token=resident_s, read_s=tuple(read_s),
                  slowdown_s_per_read=slowdown_s,
                  source=f"measured here on {device}, interleaved with the decode windows: the engine with every "
                         f"expert resident, and the same engine reading 1 to {len(read_s)} random experts of a layer "
                         f"after each layer with its loader (O_DIRECT, up to {oi.ExpertLoader.READ_THREADS} in "
                         f"flight): the reads, and how much its time per token less those reads exceeds the "
                         f"resident engine's, per read"
                         + ("; on CUDA the copies into the slots included" * (device != "cpu")))


def resident_seconds(device, active_bytes=None):
    """Seconds per token with every expert resident: measured, or active bytes / memory bandwidth."""
    if device.resident_s_per_token is not None:
        return device.resident_s_per_token
    return active_bytes / device.memory_bandwidth


def miss_seconds(device, expert_bytes, in_flight=False):
    """One miss: the expert read from storage, then copied to the device where the slots are not in host memory.
    Measured (read_s): a lone read, or the per-read share of a full group of reads in flight."""
    if device.read_s:
        return device.read_s[-1] / len(device.read_s) if in_flight else device.read_s[0]
    bw = device.in_flight_bandwidth if in_flight and device.in_flight_bandwidth else device.read_bandwidth
    return expert_bytes / bw + (expert_bytes / device.host_to_device if device.host_to_device else 0.0)


def read_seconds(device, n, expert_bytes):
    """A layer's n misses of one token, read together: measured for n up to top-k (a decode token never has
    more); from the profile's figures, a lone miss at the single-read bandwidth, several in flight."""
    if device.read_s:
        return device.read_s[n - 1] if n <= len(device.read_s) else n * miss_seconds(device, expert_bytes, True)
    return miss_seconds(device, expert_bytes) if n == 1 else n * miss_seconds(device, expert_bytes, True)


def seconds_per_token(device, misses_per_token, expert_bytes, active_bytes=None):
    """The model in one line, where only misses per token are known: every miss read alone."""
    per_miss = miss_seconds(device, expert_bytes) + device.slowdown_s_per_read
    return resident_seconds(device, active_bytes) + misses_per_token * per_miss


def predict(device, sim, expert_bytes, active_bytes=None):
    """Seconds per token over the counted steps of `sim` (a cache.SimResult): each (step, layer)'s misses
    read together, each miss slowing the compute by the measured slowdown."""
    counts = torch.bincount(sim.misses.flatten())  # [n]: how many (step, layer) pairs missed n experts
    reads = sum(int(c) * read_seconds(device, n, expert_bytes) for n, c in enumerate(counts.tolist()) if n and c)
    reads += sim.misses.sum().item() * device.slowdown_s_per_read
    return resident_seconds(device, active_bytes) + reads / sim.tokens.sum().item()


class ReadProbe:
    """This machine's read figures, measured as the engine pays them. Wraps an engine with every expert resident:
    after each MoE layer of a decode token it reads n random experts of that layer (n = 1 .. max_n in turn)
    through the engine's loader into slots of its own, which nothing computes with, and times the read. So the
    reads come between computations as misses do, and the computations run with reads between them as in an
    offloading engine, whose compute the reads slow (they share the CPU's caches, and wake reader threads).
    `replay` is the engine's, less the probe's reads."""

    def __init__(self, engine, max_n, seed=0):
        self.engine, self.rng, self.max_n, self.count = engine, random.Random(seed), max_n, 0
        self.slots = oi.ExpertSlots(max_n, engine.store.shapes, engine.dtype, engine.device)
        self.per_window = []  # per replay: ([n - 1] -> seconds of each timed read of n experts, decode tokens)
        for p in engine.providers:
            p.after = self.read

    def read(self, layer, x):
        if x.shape[0] != 1:  # a prompt: not a decode token
            return
        self.count += 1
        n = self.count % self.max_n + 1  # every size in turn
        experts = self.rng.sample(range(self.engine.cfg.n_routed_experts), n)
        t0 = time.perf_counter()
        self.engine.loader.load_many(layer, [cache.Access(e, s, False, None) for s, e in enumerate(experts)], self.slots)
        self.engine.synchronize()
        self.per_window[-1][0][n - 1].append(time.perf_counter() - t0)

    def replay(self, window, prompt_len):
        self.per_window.append(([[] for _ in range(self.max_n)], len(window) - prompt_len))
        seconds, totals, logits = self.engine.replay(window, prompt_len)
        return seconds - sum(map(sum, self.per_window[-1][0])), totals, logits

    def reads_per_token(self, skip=0):
        """Experts read per decode token over the windows after the first `skip`."""
        windows = self.per_window[skip:]
        return sum(n * len(r) for reads, _ in windows for n, r in enumerate(reads, 1)) / sum(t for _, t in windows)

    def close(self):
        self.engine.close()


def decode_traces(indices, prompt_len):
    """cache.simulate's traces of teacher-forced decoding (offload_infer.OffloadEngine.replay): per window the
    prompt as one step, then one step per token. indices: [L] of (N, P + C, K), a model's routing of the windows."""
    per_layer = [i.tolist() for i in indices]
    N, T = len(per_layer[0]), len(per_layer[0][0])
    return [[[layer[n][:prompt_len] for layer in per_layer]]
            + [[[layer[n][t]] for layer in per_layer] for t in range(prompt_len, T)] for n in range(N)]


def simulate_decode(indices, prompt_len, capacities):
    """{capacity: cache.SimResult}: LRU from a cold cache per window, the prompt's step filling it uncounted."""
    traces = decode_traces(indices, prompt_len)
    return {c: cache.simulate(traces, "lru", c, cache.SimOptions(warmup_steps=1)) for c in capacities}


def routing(net, windows, capacity=None, rule=None, prompt_len=0):
    """[L] of (N, T, K): `net`'s routing of `windows` (N, T) in one batched forward pass; with a rule, cache-aware
    routing over a cache of `capacity` experts per layer, the first prompt_len tokens one step (cache.steered)."""
    with cache.steered(net, capacity, rule, prompt_len=prompt_len):
        return [r.indices.cpu() for r in net(windows.to(next(net.parameters()).device), return_routing=True)[1]]


def study(sims, devices, expert_bytes, active_bytes):
    """Per device its name, source and, per capacity, the predicted ms per token of each contender, from
    sims {contender: {capacity: cache.SimResult}}."""
    caps = list(next(iter(sims.values())))
    return [{"name": d.name, "source": d.source,
             "rows": [{"capacity": c, "ms_per_token": {m: 1e3 * predict(d, per_cap[c], expert_bytes, active_bytes)
                                                       for m, per_cap in sims.items()}} for c in caps]}
            for d in devices]
