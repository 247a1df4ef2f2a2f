"""
latency.py: how long an offloaded decode token takes on a device, predicted before running there.

What it teaches: a token costs what it costs with every expert resident, plus, for every expert the
cache misses, one read from storage and (where the slots live in device memory) one copy over the
host-to-device link:

    time per token = resident time + misses per token x (expert bytes / read bandwidth
                                                         + expert bytes / host-to-device bandwidth)

The misses per token come from a routing trace replayed through the LRU simulator (cache.py), not from
a decode run, so the prediction can be checked against one. The engine reads a layer's misses of one
token up to offload_infer.ExpertLoader.READ_THREADS at a time: a lone miss goes at the single-read
bandwidth, several at the bandwidth with reads in flight where the profile knows it. A device is a
`Device`: this machine's figures are measured (bench.physical_bound); others come from PROFILES, each
with its source. Leaves out: prefetch, reads overlapping compute, copies overlapping reads.
"""

from dataclasses import dataclass

import torch

import checkpoint
import cache


@dataclass(frozen=True)
class Device:
    name: str
    read_bandwidth: float                      # bytes/s reading single experts in random order, one at a time
    host_to_device: float | None               # bytes/s copying an expert into a device slot; None: host memory
    source: str                                # where every figure comes from
    resident_s_per_token: float | None = None  # measured time per token with every expert resident, or
    memory_bandwidth: float | None = None      # bytes/s the device streams weights at: resident = active bytes / it
    in_flight_bandwidth: float | None = None   # bytes/s with several reads in flight, where known


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


def this_machine(bound, device="cpu"):
    """This machine's profile from bench.physical_bound's measurements: single and in-flight read bandwidth
    of random single-expert reads, and the resident engine's time per token."""
    return Device("this machine", bound["bandwidth_bytes_per_s"], None,
                  source=f"measured here on {device} (bench.physical_bound): random O_DIRECT reads of single experts, "
                         f"one and {bound['in_flight']} in flight, and the engine with every expert resident"
                         + ("; on CUDA the engine's copies overlap its reads and are not counted" * (device != "cpu")),
                  resident_s_per_token=bound["resident_ms_per_token"] / 1e3,
                  in_flight_bandwidth=bound["parallel_bandwidth_bytes_per_s"])


def resident_seconds(device, active_bytes=None):
    """Seconds per token with every expert resident: measured, or active bytes / memory bandwidth."""
    if device.resident_s_per_token is not None:
        return device.resident_s_per_token
    return active_bytes / device.memory_bandwidth


def miss_seconds(device, expert_bytes, in_flight=False):
    """One miss: the expert read from storage, then copied to the device where the slots are not in host memory."""
    bw = device.in_flight_bandwidth if in_flight and device.in_flight_bandwidth else device.read_bandwidth
    return expert_bytes / bw + (expert_bytes / device.host_to_device if device.host_to_device else 0.0)


def seconds_per_token(device, misses_per_token, expert_bytes, active_bytes=None):
    """The model in one line: resident time + misses per token x the time of one miss."""
    return resident_seconds(device, active_bytes) + misses_per_token * miss_seconds(device, expert_bytes)


def predict(device, sim, expert_bytes, active_bytes=None):
    """Seconds per token over the counted steps of `sim` (a cache.SimResult): a layer's lone miss of a step is
    read alone, several are read in flight."""
    misses = sim.misses.flatten()
    alone, together = (misses == 1).sum().item(), misses[misses > 1].sum().item()
    reads = alone * miss_seconds(device, expert_bytes) + together * miss_seconds(device, expert_bytes, True)
    return resident_seconds(device, active_bytes) + reads / sim.tokens.sum().item()


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


def routing(path, windows, device="cpu", dtype="float32"):
    """[L] of (N, T, K): a model's routing of `windows` (N, T) in one batched forward pass."""
    net = checkpoint.load_model(path, device, getattr(torch, dtype))
    with torch.no_grad():
        return [r.indices.cpu() for r in net(windows.to(device), return_routing=True)[1]]


def study(sims, devices, expert_bytes, active_bytes):
    """Per device its name, source and, per capacity, the predicted ms per token of each model, from
    sims {model: {capacity: cache.SimResult}}."""
    caps = list(next(iter(sims.values())))
    return [{"name": d.name, "source": d.source,
             "rows": [{"capacity": c, "ms_per_token": {m: 1e3 * predict(d, per_cap[c], expert_bytes, active_bytes)
                                                       for m, per_cap in sims.items()}} for c in caps]}
            for d in devices]
