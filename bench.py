"""
bench.py: one run that answers what a reader of the ReMoE paper asks: on my model and my memory budget,
how much does ReMoE save, what does it cost, and how does it compare with what I could do instead?
The base MoE and its ReMoE twin (same weights, new routers) are measured on the same held-out windows
in one process, every comparison a ratio taken side by side with its interval (stats.py): quality and
the certificate, reuse, the cache study (LRU, LFU, Belady), the Pareto front against training-free
cache-aware routing, offloaded decoding of the same tokens against the physical bound, llama.cpp under
memory limits, resident peers. Every figure goes to results.json; results.md and the plots are drawn
from it. Leaves out: batched decoding, prefetch, warm caches, energy. Follows: the ReMoE paper's metrics.

    python bench.py --quick                     # under a minute on 2 CPU cores: a first look
    python bench.py                             # the full study of runs/default/{base,remoe} (CUDA if present)
    python bench.py --only decode               # same-token decode, base vs ReMoE, and the engine's bound
    python bench.py --base ckpt/ds2 --tuned runs/ds2/remoe --data corpus.jsonl --out runs/bench-ds2
    python bench.py --shape deepseek-v2-lite --decode-windows 4 --decode-tokens 32   # real expert sizes

Shapes: W windows, T tokens per window, L MoE layers, K top-k, E routed experts, V vocabulary.
"""

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import cache
import checkpoint
import cli
import latency
import model
import offload_infer as oi
import router
import stats
import store
import testbed
from data import DataConfig, eval_windows, prepare_data
from cli import UserError

REUSE_WINDOWS = (1, 2, 4)


# ----------------------------------------------------------------------------------------------
# Settings: every default once, and the smaller values --quick uses where no flag was given

@dataclass
class Settings:
    # models and data (the default models and token cache are where train.py writes them)
    base: str = str(cli.DEFAULT_BASE_DIR)
    tuned: str = str(cli.DEFAULT_TUNED_DIR)
    data: str | None = None
    data_dir: str = str(cli.DEFAULT_RUN / "data")
    out: str = "runs/bench"
    # held-out windows: quality, reuse and the cache study
    seq_len: int = 256
    windows: int = 64
    batch_size: int = 8
    # cache study: capacities as multiples of top-k, capped at E, plus E itself
    capacities: list | None = None
    capacity_multiples: tuple = (1, 1.5, 2, 3, 4, 6, 8)
    # the Pareto front at caches of m x top-k (`pareto_multiples`; 2 x top-k is the headline), on the first
    # `pareto_windows` windows: ReMoE's lambda sweep
    # (`python train.py --sweep ...` writes it to SWEEP/ANCHOR-lambdaX/remoe), training-free cache-aware routing
    # (a bonus on cached experts' router scores, i.e. probabilities under softmax, routed token by token), both
    # combined, and the lambda = 0 control with and without it. Biases from 0.005, which tips only the close
    # calls between the K-th and the next expert, to 0.1, more than a top choice's whole score among 32 experts.
    # The guaranteed mode keeps each token's true top-J (`pareto_keep`) and lets the other K - J go to cached
    # experts within a margin of the K-th best score (model.guaranteed_topk), one point per margin
    sweep: str = str(cli.DEFAULT_RUN / "sweep")
    cache_bias: tuple = (0.005, 0.01, 0.02, 0.05, 0.1)
    pareto_keep: int = 2
    pareto_margins: tuple = (0.005, 0.01, 0.02, 0.05)
    pareto_windows: int = 16
    pareto_multiples: tuple = (1, 2, 4)
    # decode: offloaded decoding of the same held-out windows by every contender (teacher forcing)
    decode_capacities: list | None = None
    decode_multiples: tuple = (1, 2, 4)
    decode_windows: int = 16
    prompt_tokens: int = 32
    decode_tokens: int = 64
    decode_bias: float = 0.05   # the cache-aware contenders' bias
    repeats: int = 3            # peers: timed runs per engine, best kept
    # llama.cpp under memory limits leaving room for m x top-k experts per MoE layer
    llama_multiples: tuple = (1, 2, 4)
    llama_tokens: int = 256
    llama_repeats: int = 3
    llama: bool = True
    device: str | None = None
    threads: int = 0
    peers: bool = True
    compile: bool = True        # peers: also the engine with its decode step compiled (offload_infer.py --compile)
    quick: bool = False
    shape: str | None = None    # measure a real model's expert shapes instead (SHAPES)
    only: str | None = None     # "decode": the decode section alone (same-token rows and the physical bound)


# --quick also pins one CPU thread: with two, a small model's OpenMP threads spin-wait on each other on a shared machine
QUICK = dict(windows=8, capacity_multiples=(1, 2, 4), pareto_windows=2, cache_bias=(0.05,), pareto_keep=1,
             pareto_margins=(0.05,), pareto_multiples=(2,), llama_multiples=(2,),
             llama_tokens=48, llama_repeats=1,
             decode_multiples=(2,), decode_windows=3, decode_tokens=16, repeats=2, threads=1)


def capacity_grid(multiples, K, E, with_all=False):
    """Per-layer cache sizes round(m * K) for each multiple m, kept within 1..E; E added on request."""
    caps = {min(E, max(1, round(m * K))) for m in multiples}
    return sorted(caps | ({E} if with_all else set()))


# ----------------------------------------------------------------------------------------------
# Inputs: the two checkpoints and the held-out windows, all checked before any slow work

def check_pair(base, tuned):
    """The base model's config, after checking that the tuned model has the same architecture:
    ReMoE changes router weights only, so every config field must agree."""
    cfg = checkpoint.read_config(base)
    try:
        cfg_t = checkpoint.read_config(tuned)
    except cli.UserError as e:
        if not Path(tuned).is_dir():
            hint = ("make it with: python train.py" if Path(base) == Path(Settings.base)
                    else f"train.py writes it to OUT/remoe: python train.py --model {base} --out OUT")
            raise cli.UserError(f"{e} ({hint})") from None
        raise
    if not cfg.moe_layers:
        raise UserError(f"{base}: {cfg.model_type} config has no MoE layers: there is no routing to study")
    a, b = asdict(cfg), asdict(cfg_t)
    for key in a:
        if a[key] != b[key]:
            raise UserError(f"{base} and {tuned} differ in {key} ({a[key]!r} vs {b[key]!r}); expected the same "
                             f"architecture and experts, since ReMoE tunes only the routers")
    return cfg


def check_settings(s, cfg, caps):
    """Validate the numbers a user can pass, each against the model where it matters."""
    E, ctx = cfg.n_routed_experts, cfg.max_position_embeddings
    for c in sorted(set(caps)):
        if not 1 <= c <= E:
            raise UserError(f"capacity {c} must be between 1 and the number of routed experts ({E})")
    if not 2 <= s.seq_len <= ctx:
        raise UserError(f"--seq-len must be between 2 and the model's context of {ctx}, got {s.seq_len}")
    if s.windows < 1 or s.batch_size < 1 or s.repeats < 1 or s.decode_windows < 1:
        raise UserError("--windows, --batch-size, --repeats and --decode-windows must be >= 1")
    if not 1 <= s.pareto_windows <= s.windows:
        raise UserError(f"--pareto-windows must be between 1 and --windows ({s.windows}), got {s.pareto_windows}")
    if any(not b > 0 for b in s.cache_bias) or any(not m > 0 for m in s.pareto_margins):
        raise UserError(f"--cache-bias and --pareto-margins values must be > 0 (0 is plain routing), got "
                        f"{list(s.cache_bias)} and {list(s.pareto_margins)}")
    if s.only is None and not 0 <= s.pareto_keep < cfg.num_experts_per_tok:  # the front's; --only decode has none
        raise UserError(f"--pareto-keep must be between 0 and top-k - 1 ({cfg.num_experts_per_tok - 1}; top-k is "
                        f"plain routing), got {s.pareto_keep}")
    if s.decode_tokens < 2 or s.prompt_tokens < 1:
        raise UserError(f"--decode-tokens must be >= 2 and --prompt-tokens >= 1, got {s.decode_tokens} and "
                        f"{s.prompt_tokens}")
    if s.llama_repeats < 1 or s.llama_tokens < 1 or any(not m > 0 for m in s.llama_multiples):
        raise UserError("--llama-repeats, --llama-tokens and --llama-multiples must be > 0")
    if 2 not in s.pareto_multiples or any(not m > 0 for m in s.pareto_multiples):
        raise UserError(f"--pareto-multiples must be > 0 and include 2 (the headline cache, 2 x top-k), got "
                        f"{list(s.pareto_multiples)}")
    if not s.decode_bias > 0:
        raise UserError(f"--decode-bias must be > 0, got {s.decode_bias}")
    if s.prompt_tokens + s.decode_tokens > ctx:
        raise UserError(f"--prompt-tokens {s.prompt_tokens} plus --decode-tokens {s.decode_tokens} exceeds the "
                         f"model's context of {ctx}")


def held_out(s, cfg):
    """(W, T+1) teacher-forcing windows and the decode windows, both from the test split."""
    corpus, test = held_out_text(s)
    windows = eval_windows(test, s.seq_len, s.windows)  # (W, T+1)
    if int(windows.max()) >= cfg.vocab_size:
        raise UserError(f"{s.base}: tokenizer ids reach {int(windows.max())}, beyond the model's vocabulary "
                         f"of {cfg.vocab_size}")
    return windows, decode_windows(s, test), corpus.source, [int(t) for t in test]


def held_out_text(s):
    """The corpus and its test split's token ids, tokenized by the base model's tokenizer.json."""
    corpus, _, data = prepare_data(DataConfig(data=s.data), Path(s.data_dir), Path(s.base))
    return corpus, data.test


def decode_windows(s, test):
    """(N + 1, P + C) windows of the test split for decoding, each a prompt and its true continuation; the
    first is a warm-up, discarded."""
    length = s.prompt_tokens + s.decode_tokens
    if len(test) < (s.decode_windows + 1) * length:
        raise UserError(f"the test split has {len(test)} tokens, fewer than --decode-windows + 1 = "
                        f"{s.decode_windows + 1} windows of --prompt-tokens + --decode-tokens = {length}")
    return eval_windows(test, length - 1, s.decode_windows + 1)  # (N + 1, P + C)


# ----------------------------------------------------------------------------------------------
# Quality: perplexity and top-1 predictions from one teacher-forced pass, which also records the
# routing that the reuse and cache-study sections read

class TeacherForced(NamedTuple):
    layers: list           # decoder-layer id of each MoE layer
    indices: list          # [L] of (W, T, K) chosen experts
    nll: torch.Tensor      # (W,) summed next-token loss of each window, float64
    top1: torch.Tensor     # (W, T) argmax of the logits


@torch.no_grad()
def teacher_forced(net, windows, batch_size):
    device = next(net.parameters()).device
    nll, top1, per_batch = [], [], []
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        logits, routing = net(chunk[:, :-1], return_routing=True)  # (B, T, V)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="none")
        nll.append(ce.view(chunk.shape[0], -1).double().sum(1).cpu())  # (B,)
        top1.append(logits.argmax(-1).cpu())
        per_batch.append([r.indices.cpu() for r in routing])
    indices = [torch.cat([b[l] for b in per_batch]) for l in range(len(per_batch[0]))]  # [L] (W, T, K)
    return TeacherForced([r.layer for r in routing], indices, torch.cat(nll), torch.cat(top1))


def perplexity(nll_sum, tokens):
    return math.exp(nll_sum / tokens)


def quality(passes, T):
    """Perplexity of each model and of tuned relative to base; top-1 agreement with the base model."""
    out = {}
    for name, p in passes.items():
        loss = p.nll.sum().item() / p.nll.numel() / T
        out[name] = {"loss": loss, "perplexity": math.exp(loss), "tokens": p.nll.numel() * T,
                     "top1_agreement_with_base": (p.top1 == passes["base"].top1).double().mean().item()}
    out["perplexity_ratio"] = out["tuned"]["perplexity"] / out["base"]["perplexity"]
    return out


# ----------------------------------------------------------------------------------------------
# Reuse: how often a token's experts were already used by the previous w tokens (router.py), and
# how evenly the experts are loaded, which reuse must not buy by collapsing onto a few experts

def reuse(passes, E):
    out = {"layers": passes["base"].layers, "windows": list(REUSE_WINDOWS)}
    for name, p in passes.items():
        routing = [model.Routing(layer, idx, None, None) for layer, idx in zip(p.layers, p.indices)]
        rep = router.routing_report(routing, E, windows=REUSE_WINDOWS)
        out[name] = {"overall": {str(w): rep["reuse"][w] for w in REUSE_WINDOWS},
                     "per_layer": {str(w): rep["reuse_per_layer"][w] for w in REUSE_WINDOWS},
                     "load_max_over_mean": rep["load_max_over_mean"]}
    out["change"] = {str(w): out["tuned"]["overall"][str(w)] / out["base"]["overall"][str(w)] - 1
                     for w in REUSE_WINDOWS}
    return out


# ----------------------------------------------------------------------------------------------
# Cache study: the teacher-forced routing replayed through per-layer caches, one step per token in
# window order, each window starting cold (cache.simulate's defaults)

CACHE_METHOD = ("routing of the teacher-forced test windows replayed one token per step in window order; "
                "each window starts with empty caches; one cache of `capacity` experts per MoE layer; a token's "
                "top-k are needed together (cache.simulate defaults); hit rate = hits / (tokens x top-k x MoE layers). "
                "Belady is the optimum for a fixed routing: cache-aware routing changes the routing, so it can pass it")


def cache_study(indices, capacities, tick):
    """{policy: [row per capacity]} for LRU, LFU and Belady over the traces of indices [L] (W, T, K)."""
    traces = cache.token_traces(indices)
    out = {}
    for policy in cache.POLICIES:
        rows = []
        for c in capacities:
            r = cache.simulate(traces, policy, c)
            rows.append({"capacity": c, "hit_rate": r.hit_rate, "loads_per_token": r.misses_per_token,
                         "layer_hit_rates": r.layer_hit_rates()})
            tick()
        out[policy] = rows
    return out


# ----------------------------------------------------------------------------------------------
# The Pareto front: what ReMoE buys, against what cache-aware routing gives without training. Every
# point is one model and one routing rule on the same windows: its LRU hit rate at a cache of m x top-k
# (x) and its perplexity (y). Cache-aware routing depends on the cache, so its routing cannot be
# replayed from a plain trace: a batched teacher-forced pass routes each token as the offload engine
# would, through an LRU cache simulated token by token (cache.steered), and gives its hit rate and,
# from the same logits, its perplexity.

PARETO_METHOD = ("one point per model and routing rule on the same first windows: hit rate of an LRU cache of the "
                 "stated size per MoE layer, cold at each window, and perplexity. Plain routing: the model's batched "
                 "pass, its routing replayed by cache.simulate. Cache-aware routing adds `bias` to the router scores "
                 "of the experts the layer's cache holds before the top-k (model.Gate's bonus; the combine weights "
                 "stay the unbiased scores), measured by one batched teacher-forced pass that routes each token as "
                 "OffloadEngine decoding one token per step does, over an LRU cache per window simulated token by "
                 "token (cache.steered); the guaranteed mode (offload_infer.py --cache-keep J --cache-margin M) keeps each "
                 "token's true top-J and fills the other K - J slots with the best cached experts scoring at least the "
                 "K-th best score minus M, else the best remaining ones. ReMoE trained under cache-aware routing (train.py "
                 "--train-routing bias:B or keep:J:M over an LRU cache of 2 x top-k) runs under the routing it was trained "
                 "for. Agreement: the fraction of chosen (token, "
                 "expert) pairs in the router's own top-k on the same hidden state; KL: KL(true || used routing "
                 "weights) per token and MoE layer (model.routing_drift), 1 and 0 for plain routing. The lambda = 0 "
                 "control is the same ReMoE pipeline without the reuse loss: router "
                 "fine-tuning alone changes perplexity, so equal perplexity is judged against it")
BUDGETS = (0.0, 0.005, 0.01, 0.02, 0.05)  # perplexity allowed above the base model's, for the verdict


@torch.no_grad()
def cache_aware(path, windows, capacity, bias, device, dtype=None, keep=None, margin=0.0, batch_size=8):
    """One cache-aware point of a model on `windows` (N, T+1), with a bias or the guaranteed mode (keep, margin):
    hit rate, loads per token, perplexity, agreement and KL; its top-1 predictions (N, T), routing (N, T, L, K).
    One batched teacher-forced pass under cache.steered, which routes every token as the offload engine does
    decoding one token per step (an LRU cache per window, cold at its start)."""
    net = checkpoint.load_model(path, device, dtype or torch.float32)
    rule, drift = {"bias": bias} if keep is None else {"keep": keep, "margin": margin}, []
    with cache.steered(net, capacity, rule, drift):
        p = teacher_forced(net, windows, batch_size)
    agreement, kl = (torch.cat([d[i] for d in drift]).double().mean().item() for i in (0, 1))  # over tokens and layers
    point = {**plain_point(p, capacity, p.top1), "bias": bias, **({"keep": keep, "margin": margin} if keep is not None
                                                                  else {}), "agreement": agreement, "kl": kl}
    del point["top1_agreement_with_base"]  # against the base model: the caller's
    return point, p.top1, torch.stack(p.indices, 2)  # trace (N, T, L, K)


def plain_point(p, capacity, base_top1):
    """The same figures for a model's plain routing, from its batched pass p (TeacherForced) and LRU replay."""
    r = cache.simulate(cache.token_traces(p.indices), "lru", capacity)
    return {"bias": 0.0, "hit_rate": r.hit_rate, "loads_per_token": r.misses_per_token, "agreement": 1.0, "kl": 0.0,
            "layer_hit_rates": r.layer_hit_rates(),
            "perplexity": perplexity(p.nll.sum().item(), p.top1.numel()), "window_nll": p.nll.tolist(),
            "top1_agreement_with_base": (p.top1 == base_top1).double().mean().item()}


def change_interval(point, base_point, T):
    """95% interval of the point's perplexity relative to the base model's, from the paired per-window
    difference of mean next-token loss (the same windows for every point): [low, high] - 1."""
    diff = [(a - b) / T for a, b in zip(point["window_nll"], base_point["window_nll"])]
    mean, half = stats.t_interval(diff)
    return [math.exp(mean - half) - 1, math.exp(mean + half) - 1]


def anchor_of(tuned):
    """The anchor train.py tuned a model with (from its results.json), so its control is the same pipeline."""
    f = Path(tuned) / "results.json"
    return json.loads(f.read_text()).get("settings", {}).get("anchor", "distill") if f.is_file() else "distill"


def sweep_models(folder, base):
    """The tuned models `python train.py --sweep` left under `folder` (ANCHOR-lambdaX/remoe), each checked
    to be a twin of the base model: [{"path", "anchor", "reuse_set", "routing", "rule", "lambda"}], ordered by
    anchor, reuse set, routing and lambda; "routing" is the cache-aware routing it was trained under
    (train.py --train-routing, "" for none) and "rule" that routing parsed (cli.parse_routing), or None."""
    found = []
    for results in Path(folder).glob("*/remoe/results.json"):
        settings = json.loads(results.read_text()).get("settings", {})
        cfg, routing = check_pair(base, results.parent), settings.get("train_routing", "")
        found.append({"path": str(results.parent), "anchor": settings.get("anchor", "distill"),
                      "reuse_set": settings.get("reuse_set", "window"), "routing": routing,
                      "rule": cli.parse_routing(routing, cfg.num_experts_per_tok) if routing else None,
                      "lambda": float(settings.get("reuse_weight", math.nan))})
    return sorted(found, key=lambda m: (m["anchor"], m["reuse_set"], m["routing"], m["lambda"]))


def pareto_front(points):
    """The points that no other point beats on both axes (a hit rate at least as high and a perplexity at
    least as low, one of them strictly), by hit rate."""
    def beaten(p):
        return any(q["hit_rate"] >= p["hit_rate"] and q["perplexity"] <= p["perplexity"]
                   and (q["hit_rate"] > p["hit_rate"] or q["perplexity"] < p["perplexity"]) for q in points)
    return sorted((p for p in points if not beaten(p)), key=lambda p: p["hit_rate"])


def verdict(families, base_ppl):
    """For each perplexity budget (base perplexity x (1 + b)): the best hit rate each family reaches
    within it (None where none of its points does), the family that reaches the highest, and which of
    its points does (its index in the family)."""
    rows = []
    for b in BUDGETS:
        limit = base_ppl * (1 + b)
        best = {name: max((p["hit_rate"] for p in pts if p["perplexity"] <= limit), default=None)
                for name, pts in families.items()}
        reached = {name: h for name, h in best.items() if h is not None}
        winner = max(reached, key=reached.get) if reached else None
        index = next(i for i, p in enumerate(families[winner]) if p["perplexity"] <= limit
                     and p["hit_rate"] == reached[winner]) if winner else None
        rows.append({"budget": b, "best_hit_rate": best, "winner": winner, "winner_index": index})
    return rows


def pareto_section(s, paths, passes, sweep, control, windows, decode_windows, device, dtype, traces, tick):
    """The front at each cache of s.pareto_multiples x top-k: every family's points with their intervals, the
    verdict per budget, and the same-token decode speedup of the best point within +0.5% (DECODE_BUDGET)."""
    cfg, dtype_name = checkpoint.read_config(paths["base"]), str(dtype).removeprefix("torch.")
    K, E, n, T = cfg.num_experts_per_tok, cfg.n_routed_experts, s.pareto_windows, windows.shape[1] - 1
    first = {name: p._replace(indices=[idx[:n] for idx in p.indices], nll=p.nll[:n], top1=p.top1[:n])
             for name, p in passes.items()}  # the batched passes, cut to the Pareto windows
    for m in sweep:  # each plainly routed sweep model's batched pass, once for every cache
        if m["rule"] is None:
            net = checkpoint.load_model(m["path"], device, dtype)
            first[m["path"]] = teacher_forced(net, windows[:n], s.batch_size)
            del net
        tick()
    caches = []
    for capacity in capacity_grid(s.pareto_multiples, K, E):
        entry = pareto_at(s, paths, first, sweep, control, windows[:n], capacity, device, dtype, traces, tick)
        entry["decode"] = best_point_decode(s, paths, entry, decode_windows, capacity, device, dtype_name)
        caches.append(entry)
        tick()
    return {"method": PARETO_METHOD, "capacity": min(2 * K, E), "windows": n, "tokens": n * T,
            "biases": list(s.cache_bias), "keep": s.pareto_keep, "margins": list(s.pareto_margins), "sweep": s.sweep,
            "caches": caches}


def pareto_at(s, paths, first, sweep, control, windows, capacity, device, dtype, traces, tick):
    """One cache's front: {capacity, families, fronts, verdict, base_perplexity}; the cache-aware points'
    routing goes to `traces`."""
    T, base_top1 = windows.shape[1] - 1, first["base"].top1
    families = {"base + cache-aware": [{"model": "base", **plain_point(first["base"], capacity, base_top1)}],
                "ReMoE + cache-aware": [{"model": "tuned", **plain_point(first["tuned"], capacity, base_top1)}]}
    runs = {"base + cache-aware": ("base", paths["base"]), "ReMoE + cache-aware": ("tuned", paths["tuned"])}

    def measure(family, name, path, bias, keep=None, margin=0.0, **extra):  # one cache-aware point, its trace kept
        point, top1, trace = cache_aware(path, windows, capacity, bias, device, dtype, keep, margin, s.batch_size)
        key = f"pareto_{len(traces)}"
        traces[key] = trace.permute(2, 0, 1, 3)  # (N, T, L, K) -> (L, N, T, K), as the routing traces
        families.setdefault(family, []).append({"model": name, **extra, **point, "trace": key,
                                                "top1_agreement_with_base": (top1 == base_top1).double().mean().item()})
        tick()

    for m in sweep:
        if m["rule"] is not None:  # trained under cache-aware routing: measured under it, below
            continue
        point = {"model": m["path"], "lambda": m["lambda"], "anchor": m["anchor"],
                 **plain_point(first[m["path"]], capacity, base_top1)}
        if m is control:
            families["lambda=0 control + cache-aware"] = [point]
            runs["lambda=0 control + cache-aware"] = (m["path"], Path(m["path"]))
        elif m["lambda"] > 0:
            trained_for = ", trained for the LRU cache" if m["reuse_set"] == "cache" else ""
            families.setdefault(f"ReMoE lambda sweep ({m['anchor']}{trained_for})", []).append(point)
    guaranteed = f"guaranteed J={s.pareto_keep}"  # its families start, as the others, at plain routing
    families.update({f.replace("cache-aware", guaranteed): [dict(families[f][0])] for f in runs})
    rules = [(b, None, 0.0) for b in s.cache_bias] + [(0.0, s.pareto_keep, m) for m in s.pareto_margins]
    for bias, keep, margin in rules:  # (bias, J, margin) of each cache-aware point
        for family, (name, path) in runs.items():
            measure(family if keep is None else family.replace("cache-aware", guaranteed), name, path, bias, keep, margin)
    for m in sweep:  # ReMoE trained under cache-aware routing, run under the same routing
        if m["rule"] is not None:
            measure(f"ReMoE trained under {m['routing']} ({m['anchor']})", m["path"], m["path"],
                    **{"bias": 0.0, **m["rule"], "lambda": m["lambda"], "anchor": m["anchor"]})
    base_point = families["base + cache-aware"][0]
    for pts in families.values():
        for p in pts:
            p["perplexity_change_ci95"] = change_interval(p, base_point, T)
    return {"capacity": capacity, "families": families,
            "fronts": {name: pareto_front(pts) for name, pts in families.items()},
            "verdict": verdict(families, base_point["perplexity"]), "base_perplexity": base_point["perplexity"]}


DECODE_BUDGET = 0.005  # the budget whose best point is decoded against the base model


def best_point_decode(s, paths, entry, windows, capacity, device, dtype):
    """Same-token decode of the best point within DECODE_BUDGET (its model and routing rule) against the base
    model's plain routing at `capacity`: {budget, family, point (its index), contenders (summarize_runs: each
    with its speedup over "base")}."""
    v = next(v for v in entry["verdict"] if v["budget"] == DECODE_BUDGET)
    p = entry["families"][v["winner"]][v["winner_index"]]  # the base model's plain point is always within
    rule = dict(cache_bias=p["bias"], cache_keep=p.get("keep"), cache_margin=p.get("margin", 0.0))
    opts = oi.OffloadConfig(cache=capacity, io="direct", device=str(device), dtype=dtype)
    engines = {"base": oi.OffloadEngine(paths["base"], opts),
               "best": oi.OffloadEngine(paths.get(p["model"], p["model"]), replace(opts, **rule))}
    try:
        runs = same_token_decode(engines, windows, s.prompt_tokens, warmup=1)
    finally:
        for e in engines.values():
            e.close()
    return {"budget": DECODE_BUDGET, "family": v["winner"], "point": v["winner_index"],
            "contenders": summarize_runs(runs, "base")}


# ----------------------------------------------------------------------------------------------
# Decode: real offloaded decoding of the same held-out windows by every contender (teacher forcing),
# so that the base and the tuned model, with and without cache-aware routing, process identical
# tokens and differ only in their routing; and the engine against the physical bound

DECODE_METHOD = ("OffloadEngine with --io direct; every contender replays the same held-out test windows: prefill the "
                 "prompt, then feed the true continuation token by token with the KV cache (teacher forcing), each "
                 "window from an empty expert cache with the page cache dropped; contenders take turns in A B B A "
                 "order, the first window is a discarded warm-up; ms/token is the mean over windows of the "
                 "token-by-token part with its 95% t-interval; speedup = geometric mean over windows of the paired "
                 "ratio base time / contender time, with its 95% interval; in the same rotation, for the latency "
                 "model only, the base model with every expert resident (plain and cache-aware), reading random "
                 "experts between its layers (latency.ReadProbe)")


FREE_PROMPTS, FREE_SEEDS, FREE_TEMPERATURE = 2, (0, 1, 2), 0.8  # free generation: prompts x seeds per model


def same_token_decode(engines, windows, prompt_len, warmup=1):
    """Every engine (a dict name -> OffloadEngine) replays the same test windows (N, P + C): prefill
    P tokens, then C tokens one by one, each window from a cold cache with the page cache dropped.
    Contenders take turns in A B B A order (the order flips every window) so that drift in the
    machine's speed hits all alike; the first `warmup` windows are run and discarded. Returns
    {name: per-window lists} of seconds per token, loads, MB and hits per token, and the NLL."""
    names = list(engines)
    runs = {name: {"s_per_token": [], "loads_per_token": [], "mb_per_token": [], "hit_rate": [], "nll": [],
                   "tokens": 0} for name in names}
    for i, window in enumerate(windows):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            seconds, tot, logits = engines[name].replay(window, prompt_len)
            if i < warmup:
                continue
            r, C = runs[name], tot.tokens
            r["s_per_token"].append(seconds / C)
            r["loads_per_token"].append(tot.misses_per_token)
            r["mb_per_token"].append(tot.mb_per_token)
            r["hit_rate"].append(tot.hit_rate)
            targets = torch.as_tensor(window[prompt_len + 1:], device=logits.device)
            r["nll"].append(F.cross_entropy(logits[:-1].float(), targets, reduction="sum").item())
            r["tokens"] += C - 1
    return runs


def summarize_runs(runs, baseline):
    """Mean ms/token with its 95% interval over windows, loads and MB per token, hit rate, perplexity,
    and each contender's speedup over `baseline`: the geometric mean over windows of the paired
    ratio baseline time / contender time, with its 95% interval (stats.ratio_interval)."""
    out = {}
    for name, r in runs.items():
        ms, ms_ci = stats.t_interval([s * 1e3 for s in r["s_per_token"]])
        speedup, speedup_ci = stats.ratio_interval(runs[baseline]["s_per_token"], r["s_per_token"])
        out[name] = {"windows": len(r["s_per_token"]), "ms_per_token": ms, "ms_per_token_ci95": ms_ci,
                     "loads_per_token": sum(r["loads_per_token"]) / len(r["loads_per_token"]),
                     "mb_per_token": sum(r["mb_per_token"]) / len(r["mb_per_token"]),
                     "hit_rate": sum(r["hit_rate"]) / len(r["hit_rate"]),
                     "perplexity": math.exp(sum(r["nll"]) / r["tokens"]), "speedup": speedup, "speedup_ci95": speedup_ci}
    return out


RESIDENT, RESIDENT_STEERED, READING = "every expert resident", "every expert resident + cache-aware", "reading"


def decode(paths, windows, prompt_len, capacity, bias, device, dtype):
    """One row of the decode table: base and tuned, each plain and with cache-aware routing. Interleaved with
    them, this machine's figures for the latency model: the base model with every expert resident, plain and
    cache-aware, and plain again reading random experts between its layers (latency.ReadProbe)."""
    engines = {}
    for name, path in paths.items():
        for b in (0.0, bias):
            opts = oi.OffloadConfig(cache=capacity, io="direct", cache_bias=b, device=str(device), dtype=dtype)
            engines[name + (f" + cache-aware {b:g}" if b else "")] = oi.OffloadEngine(path, opts)
    e = engines["base"]
    K, E = e.cfg.num_experts_per_tok, e.cfg.n_routed_experts
    references = {RESIDENT: 0.0, READING: 0.0} | ({RESIDENT_STEERED: bias} if bias else {})  # name -> cache bias
    for key, b in references.items():  # cache-aware routing costs compute of its own (the steer, its drift)
        resident = oi.OffloadEngine(paths["base"], replace(e.opts, cache=E, cache_bias=b))
        resident.preload_all()
        engines[key] = latency.ReadProbe(resident, K) if key == READING else resident
    try:
        runs = same_token_decode(engines, windows, prompt_len, warmup=1)
        env = {"device": str(e.device), "dtype": str(e.dtype).removeprefix("torch."), "io": e.store.io,
               "io_note": e.store.fallback, "expert_bytes": e.store.expert_bytes}
    finally:
        for x in engines.values():
            x.close()
    contenders, probe, figures = summarize_runs(runs, "base"), engines[READING], {}
    for key in references:
        runs.pop(key)
        r, name = contenders.pop(key), {RESIDENT: "resident", RESIDENT_STEERED: "resident_steered", READING: "reading"}[key]
        figures[f"{name}_ms_per_token"], figures[f"{name}_ms_per_token_ci95"] = r["ms_per_token"], r["ms_per_token_ci95"]
    reads = [stats.t_interval([1e3 * s for w, _ in probe.per_window[1:] for s in w[n]]) for n in range(K)]  # no warm-up
    figures |= {"read_ms": [m for m, _ in reads], "read_ms_ci95": [ci for _, ci in reads],
                "reads_timed": [sum(len(w[n]) for w, _ in probe.per_window[1:]) for n in range(K)],
                "reads_per_token": probe.reads_per_token(skip=1)}
    figures["slowdown_ms_per_read"] = (figures["reading_ms_per_token"] - figures["resident_ms_per_token"]) / \
        figures["reads_per_token"]
    return {"capacity": capacity, "bias": bias, "contenders": contenders, "machine": figures, "per_window": runs}, env


def physical_bound(path, windows, prompt_len, capacities, opts=None, log=print):
    """Offloaded decoding at each capacity (O_DIRECT) against the bound it should approach:
    resident time per token (all experts in slots, the same code) + bytes missed per token /
    bandwidth, where the bandwidth is measured with random O_DIRECT reads of single experts (a miss
    is a random read, not a sequential sweep). All engines replay the same windows, interleaved. The engine
    reads a token's misses in a layer up to ExpertLoader.READ_THREADS at a time, so each row also has the
    stricter bound at the bandwidth of that many reads in flight."""
    opts = opts or oi.OffloadConfig()
    cfg, in_flight = checkpoint.read_config(path), oi.ExpertLoader.READ_THREADS
    with store.ExpertStore(path, cfg, "direct") as st:
        if st.fallback:
            log(f"note: {st.fallback}")
        bandwidth = max(store.read_bandwidth(st, list(st.parts), seed=i) for i in range(3))
        parallel = max(store.read_bandwidth(st, list(st.parts), i, in_flight) for i in range(3))
    log(f"disk: {bandwidth / 1e6:.1f} MB/s reading single {st.expert_bytes / 1e6:.3f} MB experts in random "
        f"order ({'O_DIRECT' if not st.fallback else 'mmap, O_DIRECT unavailable'}), {parallel / 1e6:.1f} MB/s "
        f"with {in_flight} in flight")
    E = cfg.n_routed_experts
    engines = {"resident": oi.OffloadEngine(path, replace(opts, cache=E, io="direct"))}
    engines["resident"].preload_all()
    for c in capacities:
        engines[f"cache {c}"] = oi.OffloadEngine(path, replace(opts, cache=c, io="direct"))
    try:
        runs = summarize_runs(same_token_decode(engines, windows, prompt_len), "resident")
    finally:
        for e in engines.values():
            e.close()
    resident = runs["resident"]["ms_per_token"]
    rows = []
    for c in capacities:
        r = runs[f"cache {c}"]
        bound = resident + r["mb_per_token"] * 1e6 / bandwidth * 1e3
        strict = resident + r["mb_per_token"] * 1e6 / parallel * 1e3
        rows.append({"cache": c, "ms_per_token": r["ms_per_token"], "ms_per_token_ci95": r["ms_per_token_ci95"],
                     "bound_ms": bound, "ratio_to_bound": r["ms_per_token"] / bound,
                     "bound_parallel_ms": strict, "ratio_to_parallel_bound": r["ms_per_token"] / strict,
                     "mb_per_token": r["mb_per_token"], "loads_per_token": r["loads_per_token"],
                     "hit_rate": r["hit_rate"]})
    return {"bandwidth_bytes_per_s": bandwidth, "parallel_bandwidth_bytes_per_s": parallel, "in_flight": in_flight,
            "io_note": st.fallback, "resident_ms_per_token": resident,
            "resident_ms_per_token_ci95": runs["resident"]["ms_per_token_ci95"], "rows": rows}


def decode_section(s, paths, windows, capacities, device, dtype, log, tick):
    """The decode table at every capacity, then the base model's engine against its physical bound."""
    rows = []
    for c in capacities:
        row, env = decode(paths, windows, s.prompt_tokens, c, s.decode_bias, device, dtype)
        rows.append(row)
        tick()
    bound = physical_bound(paths["base"], windows, s.prompt_tokens, capacities,
                           oi.OffloadConfig(device=str(device), dtype=dtype), log)
    tick()
    predicted = latency_study(paths, windows[1:], s.prompt_tokens, rows, s.decode_bias, env["expert_bytes"], device,
                              dtype)
    here = {x["capacity"]: x["ms_per_token"] for x in predicted["profiles"][0]["rows"]}  # this machine
    for row in rows:  # the prediction beside each measurement
        for name, ms in here[row["capacity"]].items():
            c = row["contenders"][name]
            c["predicted_ms_per_token"], c["predicted_over_measured"] = ms, ms / c["ms_per_token"]
    return {"method": DECODE_METHOD, "windows": s.decode_windows, "prompt_tokens": s.prompt_tokens,
            "decode_tokens": s.decode_tokens, "window_ids": windows.tolist(), **env, "rows": rows, "bound": bound,
            "latency": predicted}


LATENCY_METHOD = ("latency.py: predicted time per token = resident time per token + for each MoE layer the time to "
                  "read that layer's misses of the token together; misses from each contender's routing of the decode "
                  "windows (one batched forward pass; cache-aware routing simulated token by token over the same "
                  "cache, the prompt as one step) replayed through per-layer LRU caches, cold per window, the "
                  "prompt's step uncounted, as the engine decodes them; + misses x the compute time a read adds. This "
                  "machine: the resident engine's time, the loader's read times of 1 to top-k experts and the time a "
                  "read adds, measured in each row's own interleaved run (latency.ReadProbe); the "
                  "other devices: the published figures of each profile's source, a lone miss at the single-read "
                  "bandwidth, several at the in-flight bandwidth where known")


def this_machine(row, device, steered=False):
    """latency.Device of this machine from a decode row's interleaved measurements (resident time with cache-aware
    routing on, if `steered`)."""
    m = row["machine"]
    resident = m["resident_steered_ms_per_token" if steered else "resident_ms_per_token"]
    return latency.this_machine(resident / 1e3, [x / 1e3 for x in m["read_ms"]], m["slowdown_ms_per_read"] / 1e3,
                                str(device))


def latency_study(paths, windows, prompt_len, rows, bias, expert_bytes, device, dtype):
    """The latency model (latency.py) on the decode windows (N, P + C): per profile, capacity and contender of the
    decode table the predicted ms per token, this machine's profile first (its figures from each row's run); and
    the LRU loads per token each contender's routing trace gives."""
    capacities, sims = [r["capacity"] for r in rows], {}
    for name, path in paths.items():
        net = checkpoint.load_model(path, device, getattr(torch, dtype))
        with torch.no_grad():
            sims[name] = latency.simulate_decode(latency.routing(net, windows), prompt_len, capacities)
            if bias:
                sims[f"{name} + cache-aware {bias:g}"] = {c: latency.simulate_decode(latency.routing(
                    net, windows, c, {"bias": bias}, prompt_len), prompt_len, [c])[c] for c in capacities}
        del net
    here = this_machine(rows[0], device)
    here = {"name": here.name, "source": here.source + ", with cache-aware routing on for its contenders",
            "rows": [{"capacity": r["capacity"], "ms_per_token": {
                m: 1e3 * latency.predict(this_machine(r, device, "cache-aware" in m), sims[m][r["capacity"]], expert_bytes)
                for m in sims}} for r in rows]}
    active = active_bytes(checkpoint.read_config(paths["base"]), getattr(torch, dtype))
    profiles = [here] + latency.study(sims, latency.PROFILES, expert_bytes, active)
    for p in profiles:
        for row in p["rows"]:
            row["speedup"] = row["ms_per_token"]["base"] / row["ms_per_token"]["tuned"]
    return {"method": LATENCY_METHOD, "expert_bytes": expert_bytes, "active_bytes_per_token": active,
            "trace_loads_per_token": {name: [sims[name][c].misses_per_token for c in capacities] for name in sims},
            "profiles": profiles}


def best_point_latency(results, budget=DECODE_BUDGET):
    """The Pareto front's best point within +budget perplexity of the base model (the highest hit rate at the headline
    cache, 2 x top-k) against the base model's plain routing, predicted on every profile by the one-line formula
    (latency.seconds_per_token: the front's windows keep loads per token only, so every miss is read alone)."""
    pa, dec = headline(results["pareto"]), results["decode"]
    points = [(family, p) for family, pts in pa["fronts"].items() for p in pts
              if p["perplexity"] <= pa["base_perplexity"] * (1 + budget)]
    family, best = max(points, key=lambda fp: fp[1]["hit_rate"])
    base = next(p for pts in pa["families"].values() for p in pts if p["model"] == "base" and p["bias"] == 0
                and "keep" not in p)
    lat = dec["latency"]
    row = next((r for r in dec["rows"] if r["capacity"] == pa["capacity"]), dec["rows"][0])
    here = this_machine(row, dec["device"])  # figures measured beside the decode row at that cache, if there is one

    def ms(d, p):
        return 1e3 * latency.seconds_per_token(d, p["loads_per_token"], lat["expert_bytes"], lat["active_bytes_per_token"])
    return {"budget": budget, "capacity": pa["capacity"], "family": family,
            "point": {k: best.get(k) for k in ("model", "lambda", "bias", "keep", "margin", "hit_rate", "perplexity",
                                               "loads_per_token")},
            "base_loads_per_token": base["loads_per_token"],
            "profiles": [{"name": d.name, "base_ms": ms(d, base), "best_ms": ms(d, best), "speedup": ms(d, base) / ms(d, best)}
                         for d in [here, *latency.PROFILES]]}


def free_generation(paths, prompts, capacity, seeds, new_tokens, temperature, device, dtype):
    """Each model generating its own tokens: sampled at `temperature` from each prompt with each seed, from an
    empty expert cache, the models taking turns. Never a speedup: the models decode different token streams,
    and a stream that loops (greedy decoding of a small model does: a name, then newlines) reuses experts
    trivially, which its distinct-token ratio (distinct ids / generated ids) shows."""
    engines = {name: oi.OffloadEngine(path, oi.OffloadConfig(cache=capacity, io="direct", device=str(device),
                                                             dtype=dtype)) for name, path in paths.items()}
    runs = {name: [] for name in engines}
    try:
        for i, (prompt, seed) in enumerate((p, s) for p in prompts for s in seeds):
            for name in (list(engines) if i % 2 == 0 else list(engines)[::-1]):
                e = engines[name]
                e.reset_cache()
                e.store.drop_page_cache()
                gen = torch.Generator(device=e.device).manual_seed(seed)
                _, r = e.generate(prompt, new_tokens, temperature, 1.0, gen)
                runs[name].append({"seed": seed, "ms_per_token": r.time_per_token_s * 1e3, "hit_rate": r.hit_rate,
                                   "loads_per_token": r.loads_per_token,
                                   "distinct_ratio": len(set(r.generated_ids)) / len(r.generated_ids)})
    finally:
        for e in engines.values():
            e.close()
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    return {"capacity": capacity, "temperature": temperature, "seeds": list(seeds), "prompts": len(prompts),
            "new_tokens": new_tokens, "runs": runs,
            "models": {name: {k: mean(rs, k) for k in ("ms_per_token", "hit_rate", "loads_per_token", "distinct_ratio")}
                       for name, rs in runs.items()}}


# ----------------------------------------------------------------------------------------------
# Peers: decoding with every expert resident, side by side on the same checkpoint and the same tokens:
# the offload engine with all experts cached, model.py's own generate, transformers' generate, and
# llama.cpp (the checkpoint exported to a float32 GGUF by export.py). Decode time only: the prompt's
# prefill is timed apart and subtracted, so a contender with a slow prefill is not blamed for it.

def memory_available():
    """Bytes the OS could give this process now (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def too_big(nbytes):
    """Why another copy of `nbytes` should not be loaded (a peer of a real-shaped model can hold the whole
    model again; the kernel would kill the run, losing every figure), or None."""
    free = memory_available()
    if free is not None and nbytes > 0.6 * free:  # room for the temporaries of loading and converting
        return f"left out: another {nbytes / 1e9:.1f} GB copy of the weights would not fit in the {free / 1e9:.1f} GB available"
    return None


def llama_cpp_missing():
    """Why llama.cpp cannot be measured here, or None."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama_cpp is not installed (pip install llama-cpp-python)"
    return None


def llama_cpp(gguf_path, n_ctx, threads):
    import llama_cpp as lc
    return lc.Llama(str(gguf_path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                    logits_all=False, verbose=False)


@torch.no_grad()
def peers(path, prompt, new_tokens, repeats, device, dtype, gguf_dir=None, compile=True):
    """Decode tokens/s of each contender (best of `repeats`, interleaved), and whether they agree."""
    cfg = checkpoint.read_config(path)
    ids = torch.tensor([prompt], device=device)
    net = checkpoint.load_model(path, device, dtype)
    want = model.generate(net, ids, new_tokens)[0, len(prompt):].tolist()  # the greedy tokens every contender decodes
    engine = oi.OffloadEngine(path, oi.OffloadConfig(cache=cfg.n_routed_experts, device=str(device),
                                                     dtype=str(dtype).removeprefix("torch.")))
    engine.preload_all()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def minus_prefill(generate):  # seconds of new_tokens decode steps: a run of n + 1 tokens minus a run of 1
        def run():
            sync()
            t0 = time.perf_counter()
            generate(1)
            sync()
            t1 = time.perf_counter()
            out = generate(new_tokens + 1)
            sync()
            return time.perf_counter() - t1 - (t1 - t0), out
        return run

    def engine_decode(engine):  # DecodeReport times the steps after the first token: new_tokens of them here
        def run():
            out, report = engine.generate(prompt, new_tokens + 1)
            return report.time_per_token_s * new_tokens, out
        return run

    runs = {"remoe engine, all experts cached": engine_decode(engine),
            "remoe model.generate": minus_prefill(lambda n: model.generate(net, ids, n))}
    agree, notes = {}, []
    weights = sum(p.numel() for p in net.parameters()) * torch.finfo(dtype).bits // 8  # one more copy of the model
    compiled = None
    try:  # the same engine with its one-token step compiled (offload_infer.py --cache E --compile)
        if reason := "left out (--no-compile)" if not compile else too_big(weights):
            raise UserError(reason)
        compiled = oi.OffloadEngine(path, replace(engine.opts, compile=True))
        compiled.generate(prompt, 2)  # it compiled when made (tens of seconds); outside the timed runs either way
        runs["remoe engine, all experts cached, --compile"] = engine_decode(compiled)
    except Exception as e:  # no C++ compiler, or a torch.compile limitation: report it, keep the rest
        notes.append(f"--compile: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    try:
        if reason := too_big(weights):
            raise UserError(reason)
        import transformers
        from transformers import AutoModelForCausalLM
        transformers.utils.logging.disable_progress_bar()  # its loading bar would break ours
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        mask = torch.ones_like(ids)
        runs[f"transformers {transformers.__version__} generate"] = minus_prefill(
            lambda n: hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0))
    except Exception as e:  # not installed, or an architecture this version cannot load: report it, keep the rest
        notes.append(f"transformers: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    missing = llama_cpp_missing() or (None if gguf_dir else "no folder for the GGUF")
    if missing is None and device.type == "cpu":
        import export
        gguf_path = Path(gguf_dir) / "model-f32.gguf"
        try:
            export.export_gguf(path, gguf_path, "f32")
            llm = llama_cpp(gguf_path, len(prompt) + new_tokens + 8, torch.get_num_threads())

            def llama_decode():  # the same tokens, one per step, after the prompt's prefill (not timed)
                llm.reset()
                llm.eval(prompt)
                t0 = time.perf_counter()
                for t in want:
                    llm.eval([t])
                return time.perf_counter() - t0, None
            runs["llama.cpp (float32 GGUF)"] = llama_decode
        except UserError as e:
            notes.append(f"llama.cpp: {e}")
    else:
        notes.append(f"llama.cpp: {missing or 'measured on the CPU only'}")
    for fn in runs.values():
        fn()  # warm-up
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for name, fn in runs.items():
            seconds, out = fn()
            best[name] = min(best[name], seconds)
            if out is not None:
                agree[name] = out[0, len(prompt):len(prompt) + new_tokens].tolist() == want
    engine.close()
    if compiled is not None:
        compiled.close()
    tps = {name: new_tokens / s for name, s in best.items()}
    ref = "remoe engine, all experts cached"
    return {"tokens_per_s": tps, "vs_engine": {name: tps[ref] / v for name, v in tps.items()},
            "same_greedy_tokens": agree, "notes": notes, "new_tokens": new_tokens, "prompt_tokens": len(prompt),
            "repeats": repeats, "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch.")}


# ----------------------------------------------------------------------------------------------
# The paper's measurement with the paper's runtime: llama.cpp memory-maps a GGUF, so its weights are
# page cache. In a memory cgroup whose limit leaves room for only m x top-k experts per MoE layer
# besides everything else, the kernel evicts the experts not used lately and llama.cpp faults them
# back in from disk when a token routes to them: a model whose consecutive tokens reuse experts
# faults less. Base and tuned evaluate the same token stream (one token per step), at the same
# limits, interleaved and repeated; each run is a child process in a fresh cgroup (cgroup v1, as root).

MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")
LLAMA_CHILD = r"""
import ctypes, json, os, sys, time
import llama_cpp
stat = lambda: open("/proc/self/stat").read().rsplit(")", 1)[1].split()
majflt = lambda: int(stat()[9])  # major page faults: reads from disk
read_bytes = lambda: int(next(l for l in open("/proc/self/io") if l.startswith("read_bytes:")).split()[1])
path, threads = sys.argv[1], int(sys.argv[2])
tokens = json.loads(sys.stdin.read())
llm = llama_cpp.Llama(path, n_ctx=len(tokens) + 8, n_threads=threads, n_threads_batch=threads, verbose=False)
# MADV_RANDOM on llama.cpp's mapping: a fault reads its own page, not the disk's readahead window around it,
# which can span much of a small model, so that every token would re-read it all and reuse could not show
libc, real = ctypes.CDLL(None, use_errno=True), os.path.realpath(path)
for line in open("/proc/self/maps"):
    parts = line.split()
    if len(parts) >= 6 and parts[5] == real:
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 1)  # 1 = MADV_RANDOM
times, faults, reads = [], [], []
for tok in tokens:
    f, b, t = majflt(), read_bytes(), time.perf_counter()
    llm.eval([tok])
    times.append(time.perf_counter() - t)
    faults.append(majflt() - f)
    reads.append(read_bytes() - b)
anon = int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon:")).split()[1]) * 1024
print(json.dumps({"times": times, "majflt": faults, "read_bytes": reads, "rss_anon": anon}))
"""


def memory_cgroup_missing():
    """Why llama.cpp cannot run under a memory limit here, or None."""
    missing = llama_cpp_missing()
    if missing:
        return missing
    own = own_memory_cgroup()
    if own is None:
        return f"no cgroup v1 memory controller at {MEMORY_CGROUPS}"
    if not os.access(own, os.W_OK):
        return f"cannot create memory cgroups under {own} (needs root)"
    return None


def own_memory_cgroup():
    """This process's cgroup v1 memory cgroup folder (children are made inside it), or None."""
    if not (MEMORY_CGROUPS / "memory.limit_in_bytes").exists():
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return MEMORY_CGROUPS / path.lstrip("/")
    return None


def gguf_sizes(gguf_path):
    """Bytes of one routed expert (its three matrices in one MoE layer) and of every other tensor that
    each token reads (all but the token embedding table, of which a token reads one row), from a GGUF."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = reader.get_field("general.architecture").contents()
    experts, moe_layers, other = 0, set(), 0
    for t in reader.tensors:
        if t.name.split(".")[2:3] in (["ffn_gate_exps"], ["ffn_up_exps"], ["ffn_down_exps"]):
            experts += int(t.n_bytes)
            moe_layers.add(t.name.split(".")[1])
        elif t.name != "token_embd.weight":
            other += int(t.n_bytes)
    n_experts, top_k = (reader.get_field(f"{arch}.{k}").contents() for k in ("expert_count", "expert_used_count"))
    return {"expert_bytes": experts / len(moe_layers) / n_experts, "moe_layers": len(moe_layers), "top_k": top_k,
            "non_expert_bytes": other}


def llama_cpp_under_limit(gguf_path, tokens, limit, threads, warmup=16):
    """Evaluate `tokens` one per step in llama.cpp, in a child process inside a fresh memory cgroup of
    `limit` bytes (None: unlimited), from a cold page cache. Per-token means after `warmup` tokens."""
    cgroup = own_memory_cgroup() / f"remoe-llama-{os.getpid()}-{len(tokens)}-{time.monotonic_ns()}"
    cgroup.mkdir()
    try:
        if limit is not None:
            (cgroup / "memory.limit_in_bytes").write_text(str(int(limit)))
            (cgroup / "memory.swappiness").write_text("0")
        fd = os.open(gguf_path, os.O_RDONLY)  # drop the file's pages (written out first: dirty pages stay)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        proc = subprocess.run([sys.executable, "-c", LLAMA_CHILD, str(gguf_path), str(threads)],
                              input=json.dumps(list(map(int, tokens))), capture_output=True, text=True, timeout=1800,
                              preexec_fn=lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid())))
        usage = int((cgroup / "memory.max_usage_in_bytes").read_text())
        cached = int(next(l for l in (cgroup / "memory.stat").read_text().splitlines() if l.startswith("cache ")).split()[1])
    finally:
        for _ in range(50):  # the child is gone; rmdir moves its page-cache charges to the parent
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    if proc.returncode != 0:
        return {"failed": "killed (the limit is below what llama.cpp needs)" if proc.returncode < 0
                else (proc.stderr.strip().splitlines() or ["exit status " + str(proc.returncode)])[-1]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    n = len(r["times"]) - warmup
    return {"time_per_token_s": sum(r["times"][warmup:]) / n, "majflt_per_token": sum(r["majflt"][warmup:]) / n,
            "bytes_read_per_token": sum(r["read_bytes"][warmup:]) / n, "overhead_bytes": usage - cached}


def llama_memory_study(ggufs, tokens, multiples, repeats, threads):
    """Base and tuned GGUFs under limits that leave room for m x top-k experts per MoE layer besides the
    non-expert weights and the process's own memory (measured by one unlimited run of the base model)."""
    calibration = llama_cpp_under_limit(ggufs["base"], tokens, None, threads)
    if "failed" in calibration:
        return {"skipped": f"llama.cpp failed without a limit: {calibration['failed']}"}
    s = gguf_sizes(ggufs["base"])
    limits = {m: int(calibration["overhead_bytes"] + s["non_expert_bytes"] + m * s["top_k"] * s["moe_layers"]
                     * s["expert_bytes"]) for m in multiples}
    runs = {f"{m} {name}": [] for m in multiples for name in ggufs}
    for i in range(repeats):
        for m in multiples:
            for name in list(ggufs)[:: 1 if i % 2 == 0 else -1]:  # alternate who goes first
                runs[f"{m} {name}"].append(llama_cpp_under_limit(ggufs[name], tokens, limits[m], threads))
    rows = []
    for m in multiples:
        for name in ggufs:
            ok = [r for r in runs[f"{m} {name}"] if "failed" not in r]
            row = {"multiple": m, "limit_bytes": limits[m], "model": name, "runs": len(ok)}
            for k in ("time_per_token_s", "majflt_per_token", "bytes_read_per_token"):
                vals = sorted(r[k] for r in ok)
                row[k] = vals[len(vals) // 2] if vals else None  # the median run: a shared machine's noise is one-sided
                row[k + "_range"] = [vals[0], vals[-1]] if vals else None
            rows.append(row)
    return {"sizes": s, "overhead_bytes": calibration["overhead_bytes"], "tokens": len(tokens), "repeats": repeats,
            "threads": threads, "rows": rows}


# ----------------------------------------------------------------------------------------------
# Real expert sizes (--shape): the default model's experts are 147 KB, so a miss costs about as much as
# the Python around it; a real model's are megabytes, and decoding is bound by memory and disk bandwidth.
# A checkpoint with a published model's expert shapes and dtype on disk, but a few layers, a small
# vocabulary and random weights, measures the engine where it matters: resident decoding against the
# bandwidth bound (active weight bytes / GEMV bandwidth) and transformers, and offloaded decoding
# against its I/O bound (resident time + bytes missed / disk bandwidth).

SHAPES = {  # the published configs with 3 (V2-Lite: 1 dense + 2 MoE) or 2 layers and an 8k vocabulary
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 8192,
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 3,
        "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "topk_method": "greedy",
        "norm_topk_prob": False, "routed_scaling_factor": 1.0, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 8192,
        "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 2, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "moe_intermediate_size": 768, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 4096, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16"},
}


def shape_checkpoint(name, folder):
    """The random bfloat16 checkpoint of SHAPES[name] in `folder` (built once; rebuilt if its config changed):
    N(0, 0.02) matrices, norms at 1, in the Hugging Face layout."""
    from safetensors.torch import save_file

    config, folder = SHAPES[name], Path(folder)
    if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()) == config:
        return folder
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in checkpoint.build_model(config).state_dict().items()}
    cfg, gen = checkpoint.config_from_hf(config), torch.Generator().manual_seed(0)
    state = {}
    for k, shape in tqdm(shapes.items(), desc=f"building {name}", unit="tensor", file=sys.stderr, disable=None):
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        state[checkpoint.disk_name(cfg, k)] = t.to(torch.bfloat16)
    with cli.atomic_write(folder) as tmp:
        tmp.mkdir()
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def gemv_bandwidth(device, dtype, mb=512, repeats=5):
    """Bytes per second a matrix-vector product streams from memory: one token's linear layers at best."""
    W = torch.randn(mb * 2**20 // (4096 * dtype.itemsize), 4096).to(device, dtype)  # rows x 4096, beyond the caches
    x = torch.randn(1, 4096).to(device, dtype)
    F.linear(x, W)  # warm-up
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        F.linear(x, W)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return W.numel() * W.element_size() / best


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def active_bytes(cfg, dtype):
    """Weight bytes one decode token reads: every non-routed weight (one embedding row), K experts per MoE layer."""
    with torch.device("meta"):
        net = checkpoint.build_model(cfg)
    total = sum(p.numel() for n, p in net.named_parameters() if ".experts." not in n)
    total -= net.model.embed_tokens.weight.numel() - cfg.hidden_size
    expert = sum(math.prod(shape) for shape in store.expert_shapes(cfg))
    return (total + len(cfg.moe_layers) * cfg.num_experts_per_tok * expert) * dtype.itemsize


def shape_study(s, name, log=print):
    """--shape: resident decoding at real expert sizes against its bandwidth bound and transformers, then
    offloaded decoding at several cache sizes against its I/O bound; all on the same random token windows."""
    if s.threads:
        torch.set_num_threads(s.threads)
    path = shape_checkpoint(name, Path(s.out) / "shapes" / name)
    cfg = checkpoint.read_config(path)
    K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    caps = s.decode_capacities or capacity_grid(s.decode_multiples, K, E)
    check_settings(s, cfg, caps)
    windows = torch.randint(0, cfg.vocab_size, (s.decode_windows + 1, s.prompt_tokens + s.decode_tokens),
                            generator=torch.Generator().manual_seed(0))
    device, device_why = cli.pick_device(s.device)
    dtype, dtype_why = cli.pick_dtype(device, torch.bfloat16)  # float32 on the CPU, the stored bf16 on CUDA
    bandwidth = gemv_bandwidth(device, dtype)
    need = active_bytes(cfg, dtype)
    expert_mb = sum(math.prod(shape) for shape in store.expert_shapes(cfg)) * 2 / 1e6  # bf16 on disk
    where = f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else str(device)
    log(f"{name}: {len(cfg.moe_layers)} MoE layers x {E} experts of {expert_mb:.1f} MB (bf16 on disk), top-{K}; "
        f"computed in {str(dtype).removeprefix('torch.')} on {where} ({device_why}; {dtype_why}); GEMV streams "
        f"{bandwidth / 2**30:.1f} GiB/s, a token reads {need / 1e6:.0f} MB: bound {need / bandwidth * 1e3:.2f} ms/token")
    peer = peers(path, windows[0, :s.prompt_tokens].tolist(), s.decode_tokens, s.repeats, device,
                 dtype, Path(s.out) / "shapes" / f"{name}-gguf", s.compile)
    opts = oi.OffloadConfig(device=str(device), dtype=str(dtype).removeprefix("torch."))
    bound = physical_bound(path, windows, s.prompt_tokens, caps, opts, log)
    result = {"shape": name, "config": SHAPES[name], "gemv_bandwidth_bytes_per_s": bandwidth,
              "active_bytes_per_token": need, "bandwidth_bound_ms": need / bandwidth * 1e3, "peers": peer,
              "offload": bound, "windows": s.decode_windows, "prompt_tokens": s.prompt_tokens,
              "decode_tokens": s.decode_tokens, "threads": torch.get_num_threads(), "device": str(device),
              "dtype": str(dtype).removeprefix("torch.")}
    resident = bound["resident_ms_per_token"]
    log(f"resident engine {resident:.1f} ms/token = {resident / result['bandwidth_bound_ms']:.2f}x the bandwidth bound; "
        + ", ".join(f"{n} {1e3 / v:.1f} ms/token" for n, v in peer["tokens_per_s"].items()))
    for r in bound["rows"]:
        log(f"cache {r['cache']:3d}: {r['ms_per_token']:.1f} ± {r['ms_per_token_ci95']:.1f} ms/token, bound "
            f"{r['bound_ms']:.1f} ({r['ratio_to_bound']:.2f}x), {r['mb_per_token']:.1f} MB/token, hit rate {r['hit_rate']:.3f}")
    return result


# ----------------------------------------------------------------------------------------------
# The whole run: inputs checked first, then the sections in order, one progress bar over all

class Progress:
    """One progress bar over every task of the run, and the wall time of each section."""

    def __init__(self, total):
        self.bar = tqdm(total=total, desc="bench", unit="task", file=sys.stderr, disable=None, dynamic_ncols=True)
        self.seconds, self.name, self.t0 = {}, None, time.perf_counter()

    def section(self, name):
        if self.name is not None:
            self.seconds[self.name] = time.perf_counter() - self.t0
        self.name, self.t0 = name, time.perf_counter()
        self.bar.set_description(name)

    def tick(self):
        self.bar.update()

    def close(self):
        self.section(None)
        self.bar.close()
        return self.seconds


def compute_setup(s, cfg, log):
    """The device and dtype of every section, decided once by the engine's rule (so that the batched passes
    and the engine compute alike), and what results.json records of the models and the machine."""
    device, device_why = cli.pick_device(s.device)
    dtype, dtype_why = cli.pick_dtype(device, checkpoint.stored_dtype(s.base))
    dtype_name, K, E = str(dtype).removeprefix("torch."), cfg.num_experts_per_tok, cfg.n_routed_experts
    log(f"compute: {device} ({device_why}); {dtype_name} ({dtype_why}); {torch.get_num_threads()} CPU threads")
    log(f"models: {s.base} vs {s.tuned}: {cfg.model_type}, {len(cfg.moe_layers)} MoE layers x {E} experts, top-{K}")
    return device, dtype, {
        "model": {"base": str(s.base), "tuned": str(s.tuned), "model_type": cfg.model_type,
                  "moe_layers": list(cfg.moe_layers), "n_routed_experts": E, "num_experts_per_tok": K},
        "environment": {"device": str(device), "device_reason": device_why, "dtype": dtype_name,
                        "dtype_reason": dtype_why, "threads": torch.get_num_threads(), "torch": torch.__version__}}


def decode_only(s, log=print):
    """--only decode: the decode section of the full run alone (same windows, same contenders, the bound)."""
    if s.threads:
        torch.set_num_threads(s.threads)
    cfg = check_pair(s.base, s.tuned)
    caps = s.decode_capacities or capacity_grid(s.decode_multiples, cfg.num_experts_per_tok, cfg.n_routed_experts)
    check_settings(s, cfg, caps)
    device, _, results = compute_setup(s, cfg, log)
    windows = decode_windows(s, held_out_text(s)[1])
    progress = Progress(len(caps) + 1)
    progress.section("decode")
    results["decode"] = decode_section(s, {"base": Path(s.base), "tuned": Path(s.tuned)}, windows, caps, device,
                                       results["environment"]["dtype"], log, progress.tick)
    results["section_seconds"] = progress.close()
    return results


def run(s, log=print):
    """Measure everything; returns the results dictionary (what results.json holds) and the traces."""
    t_start = time.perf_counter()
    if s.threads:
        torch.set_num_threads(s.threads)
    cfg = check_pair(s.base, s.tuned)
    K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    caps = s.capacities or capacity_grid(s.capacity_multiples, K, E, with_all=True)
    dec_caps = s.decode_capacities or capacity_grid(s.decode_multiples, K, E)
    check_settings(s, cfg, caps + dec_caps)
    sweep = sweep_models(s.sweep, s.base)
    device, dtype, header = compute_setup(s, cfg, log)
    dtype_name = header["environment"]["dtype"]
    windows, decode_windows, source, test_ids = held_out(s, cfg)
    test_tokens = len(test_ids)
    W, T = windows.shape[0], windows.shape[1] - 1
    paths = {"base": Path(s.base), "tuned": Path(s.tuned)}
    log(f"test split of {source}: {W} windows x {T} tokens")
    results = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
               "model": header["model"], "data": {"source": source, "test_tokens": test_tokens, "seq_len": T,
                                                  "windows": W}, "environment": header["environment"]}
    traces = {}
    control = next((m for m in sweep if m["lambda"] == 0 and m["anchor"] == anchor_of(s.tuned)
                    and m["reuse_set"] == "window" and not m["routing"]), None)
    pareto_caps = capacity_grid(s.pareto_multiples, K, E)
    progress = Progress(2 + 2 * len(cache.POLICIES) * len(caps) + len(sweep) + len(pareto_caps)
                        * (1 + (len(s.cache_bias) + len(s.pareto_margins)) * (2 + (control is not None))
                           + sum(m["rule"] is not None for m in sweep))
                        + len(dec_caps) + 1 + s.llama + s.peers)

    progress.section("quality")
    passes, certificate = {}, {}
    for name, path in paths.items():
        net = checkpoint.load_model(path, device, dtype)
        passes[name] = teacher_forced(net, windows, s.batch_size)
        certificate[name] = testbed.ablations(net, windows, batch_size=s.batch_size)
        del net  # one model in memory at a time
        traces[f"routing_{name}"] = torch.stack(passes[name].indices)  # (L, W, T, K)
        progress.tick()
    results["quality"] = quality(passes, T)
    results["quality"]["ablations"] = certificate

    progress.section("reuse")
    results["reuse"] = reuse(passes, E)

    progress.section("cache study")
    results["cache_study"] = {"method": CACHE_METHOD, "capacities": caps,
                              **{name: cache_study(p.indices, caps, progress.tick) for name, p in passes.items()}}

    progress.section("pareto front")
    results["pareto"] = pareto_section(s, paths, passes, sweep, control, windows, decode_windows, device, dtype,
                                       traces, progress.tick)

    progress.section("decode")
    results["decode"] = decode_section(s, paths, decode_windows, dec_caps, device, dtype_name, log, progress.tick)
    results["decode"]["latency"]["best_point"] = best_point_latency(results)
    prompts = [w[:s.prompt_tokens].tolist() for w in decode_windows[1:1 + FREE_PROMPTS]]
    results["decode"]["free"] = free_generation(paths, prompts, min(2 * K, E), FREE_SEEDS, s.decode_tokens,
                                                FREE_TEMPERATURE, device, dtype_name)

    if s.llama:
        progress.section("llama.cpp under a memory limit")
        missing = memory_cgroup_missing()
        if missing is None and len(test_ids) < s.llama_tokens + 16:
            missing = f"the test split has {len(test_ids)} tokens, fewer than --llama-tokens + 16 warm-up"
        if missing is None:
            import export
            ggufs = {name: Path(s.out) / "gguf" / f"{name}.gguf" for name in paths}
            for name, path in paths.items():
                export.export_gguf(path, ggufs[name])
            results["llama_memory"] = llama_memory_study(ggufs, test_ids[: s.llama_tokens + 16], s.llama_multiples,
                                                         s.llama_repeats, torch.get_num_threads())
        else:
            results["llama_memory"] = {"skipped": missing}
        progress.tick()
    else:
        results["llama_memory"] = {"skipped": "--no-llama was given"}

    if s.peers:
        progress.section("peers")
        prompt = decode_windows[0, :s.prompt_tokens].tolist()
        results["peers"] = peers(paths["base"], prompt, s.decode_tokens, s.repeats, device, dtype, Path(s.out) / "gguf",
                                 s.compile)
        progress.tick()
    else:
        results["peers"] = {"skipped": "--no-peers was given"}
    results["section_seconds"] = progress.close()
    results["wall_seconds"] = time.perf_counter() - t_start
    return results, traces


# ----------------------------------------------------------------------------------------------
# Report: a markdown summary, results.json, the traces, and three plots, each written atomically

def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]


LABEL = {"base": "base", "tuned": "ReMoE"}
POLICY_NAME = {"lru": "LRU", "lfu": "LFU", "belady": "Belady"}


def headline(pa):
    """The front at the headline cache, 2 x top-k."""
    return next(x for x in pa["caches"] if x["capacity"] == pa["capacity"])


def md_summary(r):
    pa, c = r["pareto"], r["pareto"]["capacity"]
    h = headline(pa)
    out = [f"## Summary: at a cache of {c} experts per MoE layer (2 x top-k)", "",
           f"First {pa['windows']} test windows ({pa['tokens']:,} tokens), LRU, cold start per window. Perplexity "
           f"budget above the base model's {h['base_perplexity']:.3f}, and the best hit rate each approach reaches "
           f"within it (methods below):", ""]
    names = list(h["families"])
    rows = [[f"+{v['budget']:.1%}"] + [f"{v['best_hit_rate'][n]:.3f}" if v["best_hit_rate"][n] is not None else "-"
                                      for n in names] + [v["winner"] or "-"] for v in h["verdict"]]
    out += table(["perplexity budget"] + names + ["highest hit rate"], rows) + [""]
    row = next((x for x in r["decode"]["rows"] if x["capacity"] == c), None)
    if row is not None:
        b, t = row["contenders"]["base"], row["contenders"]["tuned"]
        out += [f"Offloaded decoding of the same held-out tokens at {c} experts per layer: ReMoE "
                f"{t['ms_per_token']:.2f} ± {t['ms_per_token_ci95']:.2f} ms/token vs base {b['ms_per_token']:.2f} ± "
                f"{b['ms_per_token_ci95']:.2f}, a speedup of {t['speedup']:.2f}x (95% CI {t['speedup_ci95'][0]:.2f}-"
                f"{t['speedup_ci95'][1]:.2f}), with expert loads per token going from {b['loads_per_token']:.2f} to "
                f"{t['loads_per_token']:.2f}.", ""]
    return out + md_best_decode(h)


def md_best_decode(entry):
    """One line: the same-token decode speedup of the best point within +0.5% at this cache."""
    d = entry["decode"]
    b, x = d["contenders"]["base"], d["contenders"]["best"]
    p = entry["families"][d["family"]][d["point"]]
    return [f"Best point within +{d['budget']:.1%} at cache {entry['capacity']}: {d['family']}, {point_label(p)} "
            f"(hit rate {p['hit_rate']:.3f}); decoding the same tokens, {x['ms_per_token']:.2f} ms/token vs the "
            f"base model's {b['ms_per_token']:.2f}, a speedup of {x['speedup']:.2f}x (95% CI "
            f"{x['speedup_ci95'][0]:.2f}-{x['speedup_ci95'][1]:.2f}), loads per token {b['loads_per_token']:.2f} -> "
            f"{x['loads_per_token']:.2f}.", ""]


def md_quality(r):
    q = r["quality"]
    rows = [[LABEL[m], f"{q[m]['loss']:.4f}", f"{q[m]['perplexity']:.3f}",
             f"{q[m]['perplexity'] / q['base']['perplexity']:.4f}x", f"{q[m]['top1_agreement_with_base']:.4f}"]
            for m in ("base", "tuned")]
    a = q["ablations"]
    cert = [[LABEL[m], f"{a[m]['learned']:.2f}", f"{a[m]['random_router']:.2f} ({a[m]['random_router_change']:+.0%})",
             f"{a[m]['routed_experts_off']:.2f} ({a[m]['routed_experts_off_change']:+.0%})"] for m in ("base", "tuned")]
    layers = list(a["base"]["per_layer"])
    per_layer = [[LABEL[m]] + [f"{a[m]['per_layer'][l]['random_router_change']:+.0%} / "
                               f"{a[m]['per_layer'][l]['routed_experts_off_change']:+.0%}" for l in layers]
                 for m in ("base", "tuned")]
    return (["## Quality (all windows)", ""]
            + table(["model", "test loss", "test perplexity", "vs base", "top-1 agreement with base"], rows)
            + ["", "The certificate that this testbed can fail a routing method: perplexity with the learned routers, "
                   f"with random routers (each row a Gaussian of the learned row's norm, mean of "
                   f"{len(a['base']['random_router_seeds'])} seeds), and with the routed experts switched off "
                   "(shared experts, dense layers and attention kept).", ""]
            + table(["model", "learned routers", "random routers", "routed experts off"], cert)
            + ["", "The same, one MoE layer at a time (perplexity change, random routers / routed experts off):", ""]
            + table(["model"] + [f"layer {l}" for l in layers], per_layer) + [""])


def md_reuse(r):
    ru = r["reuse"]
    rows = [[f"w={w}", "all", f"{ru['base']['overall'][str(w)]:.3f}", f"{ru['tuned']['overall'][str(w)]:.3f}",
             f"{ru['change'][str(w)]:+.1%}"] for w in ru["windows"]]
    for w in ru["windows"]:
        for i, layer in enumerate(ru["layers"]):
            b, t = ru["base"]["per_layer"][str(w)][i], ru["tuned"]["per_layer"][str(w)][i]
            rows.append([f"w={w}", f"layer {layer}", f"{b:.3f}", f"{t:.3f}", f"{t / b - 1:+.1%}"])
    load = {m: max(ru[m]["load_max_over_mean"]) for m in ("base", "tuned")}
    return (["## Reuse: share of a token's experts already used by the previous w tokens", ""]
            + table(["window", "layer", "base", "ReMoE", "change"], rows)
            + ["", f"Expert load, max/mean of the most unbalanced layer: base {load['base']:.2f}, "
                   f"ReMoE {load['tuned']:.2f} (1.00 = perfectly even).", ""])


def md_cache_study(r):
    cs = r["cache_study"]
    header = ["capacity"] + [f"{POLICY_NAME[p]} {LABEL[m]}" for p in cache.POLICIES for m in ("base", "tuned")]
    rows = [[cap] + [f"{cs[m][p][i]['hit_rate']:.3f}" for p in cache.POLICIES for m in ("base", "tuned")]
            for i, cap in enumerate(cs["capacities"])]
    return ["## Cache study: hit rate against per-layer capacity", "", f"Method: {cs['method']}.", ""] + table(
        header, rows) + [""]


def point_label(p):
    """A point's routing: plain, its bias or margin, with its lambda for a sweep model."""
    rule = f"bias {p['bias']:g}" if p["bias"] else f"margin {p['margin']:g}" if "margin" in p else ""
    return " ".join(x for x in (f"lambda {p['lambda']:g}" if "lambda" in p else "", rule) if x) or "plain routing"


def md_pareto(r):
    pa = r["pareto"]
    out = [f"## Pareto front: hit rate at {', '.join(str(x['capacity']) for x in pa['caches'])} experts per layer "
           f"against perplexity", "",
           f"Method: {pa['method']}. First {pa['windows']} windows ({pa['tokens']:,} tokens); ReMoE sweep from "
           f"`{pa['sweep']}`" + ("" if any("sweep" in f for f in headline(pa)["families"]) else
                                 " (none found: `python train.py --sweep 0,0.05,0.1,0.2` makes it)") + ".", ""]
    for entry in pa["caches"]:
        out += [f"### Cache {entry['capacity']}", ""] + md_front(entry)
    out += ["A point's place against a budget is only as sure as its interval in the table: where the interval spans "
            "the budget, the verdict at that budget could come out the other way on other windows.", ""]
    return out + md_layers(r)


def md_front(entry):
    """One cache's points, its verdict per budget and the decode speedup of its best point within +0.5%."""
    rows = []
    for family, pts in entry["families"].items():
        for p in sorted(pts, key=lambda p: p["hit_rate"]):
            rows.append([family, point_label(p), f"{p['hit_rate']:.3f}", f"{p['loads_per_token']:.2f}",
                         f"{p['perplexity']:.3f}",
                         f"{p['perplexity'] / entry['base_perplexity'] - 1:+.2%} [{p['perplexity_change_ci95'][0]:+.1%}, "
                         f"{p['perplexity_change_ci95'][1]:+.1%}]", f"{p['top1_agreement_with_base']:.3f}",
                         f"{p['agreement']:.3f}", f"{p['kl']:.4f}", "yes" if p in entry["fronts"][family] else ""])
    out = table(["approach", "point", "hit rate", "loads / token", "perplexity", "vs base (95% CI, paired over windows)",
                 "top-1 = base", "agreement with top-k", "KL", "on its front"], rows) + [""]
    rows = [[f"+{v['budget']:.1%}", f"{v['best_hit_rate'][v['winner']]:.3f}", v["winner"],
             point_label(entry["families"][v["winner"]][v["winner_index"]])] for v in entry["verdict"]]
    return (out + [f"Verdict at cache {entry['capacity']}: the highest hit rate within each perplexity budget above the "
                   f"base model's (every family's best: the summary's table at 2 x top-k, results.json at each cache).", ""]
            + table(["budget", "highest hit rate", "approach", "point"], rows) + [""] + md_best_decode(entry))


def md_layers(r):
    """Per-layer hit rates at 2 x top-k beside the certificate's per-layer figures (the base model's): a gain
    in a layer whose routing barely matters (random routers cost little there) is worth little."""
    h, a = headline(r["pareto"]), r["quality"]["ablations"]["base"]["per_layer"]
    best = h["families"][h["decode"]["family"]][h["decode"]["point"]]
    base, tuned = h["families"]["base + cache-aware"][0], h["families"]["ReMoE + cache-aware"][0]
    rows = [[layer, f"{a[layer]['random_router_change']:+.0%} / {a[layer]['routed_experts_off_change']:+.0%}",
             f"{base['layer_hit_rates'][i]:.3f}", f"{tuned['layer_hit_rates'][i]:.3f}", f"{best['layer_hit_rates'][i]:.3f}"]
            for i, layer in enumerate(a)]
    return ([f"Per MoE layer at cache {h['capacity']}: the base model's certificate (perplexity change with random "
             f"routers / routed experts off in that layer alone) beside the LRU hit rates; best point = the best within "
             f"+{h['decode']['budget']:.1%} ({h['decode']['family']}, {point_label(best)}).", ""]
            + table(["layer", "certificate random / off", "hit rate base", "ReMoE", "best point"], rows) + [""])


def md_decode(r):
    dec = r["decode"]
    io = dec["io"] + (f" ({dec['io_note']})" if dec["io_note"] else "")
    rows = []
    for x in dec["rows"]:
        for name, c in x["contenders"].items():
            rows.append([x["capacity"], name, f"{c['ms_per_token']:.2f} ± {c['ms_per_token_ci95']:.2f}",
                         f"{c['speedup']:.2f}x [{c['speedup_ci95'][0]:.2f}, {c['speedup_ci95'][1]:.2f}]",
                         f"{c['hit_rate']:.3f}", f"{c['loads_per_token']:.2f}", f"{c['mb_per_token']:.3f}",
                         f"{c['perplexity']:.3f}"] + ([f"{c['predicted_ms_per_token']:.2f}",
                                                      f"{c['predicted_over_measured']:.2f}"] if "predicted_ms_per_token"
                                                     in c else ["-", "-"]))
    return ([f"## Decode: offloaded, the same {dec['windows']} held-out windows for every contender "
             f"({dec['prompt_tokens']} prompt + {dec['decode_tokens']} tokens fed one by one)", "",
             f"Method: {dec['method']}. Device {dec['device']}, {dec['dtype']}, reads: {io}.", ""]
            + table(["capacity", "contender", "ms/token (95% CI)", "speedup vs base (95% CI)", "hit rate",
                     "loads / token", "MB read / token", "perplexity", "predicted ms/token", "predicted / measured"],
                    rows) + [""] + md_bound(dec["bound"]) + (md_latency(dec) if "latency" in dec else [])
            + (md_free(dec["free"]) if "free" in dec else []))


def md_latency(dec):
    lat = dec["latency"]
    twice = ", ".join(f"{x['contenders']['base']['ms_per_token']:.2f} vs {b['ms_per_token']:.2f} at {b['cache']}"
                      for x, b in zip(dec["rows"], dec["bound"]["rows"]))
    rows = [[p["name"], x["capacity"], f"{x['ms_per_token']['base']:.3g}", f"{x['ms_per_token']['tuned']:.3g}",
             f"{x['speedup']:.2f}x"] for p in lat["profiles"] for x in p["rows"]]
    ratios = [c["predicted_over_measured"] for x in dec["rows"] for c in x["contenders"].values()]
    K = len(dec["rows"][0]["machine"]["read_ms"])

    def ci(m, key):
        return f"{m[key]:.2f} ± {m[key + '_ci95']:.2f}" if key in m else "-"
    figures = [[x["capacity"], ci(m, "resident_ms_per_token"), ci(m, "resident_steered_ms_per_token"),
                ci(m, "reading_ms_per_token"), f"{m['reads_per_token']:.2f}", f"{m['slowdown_ms_per_read']:.3f}"]
               + [f"{r:.3f} ± {c:.3f}" for r, c in zip(m["read_ms"], m["read_ms_ci95"])]
               for x in dec["rows"] for m in [x["machine"]]]
    return ([f"This machine's figures, measured in each row's interleaved run (means with 95% intervals): the base "
             f"model with every expert resident, plain and with cache-aware routing; the same engine reading random "
             f"experts after each layer (latency.ReadProbe: {min(dec['rows'][0]['machine']['reads_timed'])} or more "
             f"timed reads of each size n), its time less those reads; the compute time a read adds (that time less "
             f"the resident one, per read); and the reads. Predicted / measured over all {len(ratios)} (contender, "
             f"cache) pairs above: {min(ratios):.2f} to {max(ratios):.2f}.", ""]
            + table(["cache (row)", "resident ms/token", "resident, cache-aware", "reading, less its reads",
                     "reads / token", "ms added per read"] + [f"read {n} ms" for n in range(1, K + 1)], figures) + [""]
            + [f"Predicted time per token on each device (ReMoE's speedup over base). Method: {lat['method']}. Expert "
             f"{lat['expert_bytes'] / 1e3:.1f} KB, {lat['active_bytes_per_token'] / 1e6:.2f} MB of weights active per "
             f"token. The predicted column above is this machine's row here. For scale, the measurement's own spread: the base "
             f"engine measured twice in this run on the same windows, in the table above and in the bound's run, gave "
             f"{twice} ms/token.", ""]
            + table(["device", "cache", "base ms/token", "ReMoE ms/token", "ReMoE speedup"], rows)
            + ["", "Sources:", ""] + [f"- {p['name']}: {p['source']}." for p in lat["profiles"]] + [""]
            + (md_best_point(lat["best_point"]) if "best_point" in lat else []))


def md_best_point(b):
    p = b["point"]
    what = "".join(f", {k} {p[k]:g}" for k in ("lambda", "bias", "keep", "margin") if p[k])
    return ([f"The Pareto front's best point within +{b['budget']:.1%} perplexity at {b['capacity']} experts per layer: "
             f"{b['family']}{what}: {p['loads_per_token']:.2f} loads per token against the base model's "
             f"{b['base_loads_per_token']:.2f} on the front's windows; predicted by the one-line formula, every miss "
             f"read alone:", ""]
            + table(["device", "base ms/token", "best point ms/token", "speedup"],
                    [[x["name"], f"{x['base_ms']:.3g}", f"{x['best_ms']:.3g}", f"{x['speedup']:.2f}x"]
                     for x in b["profiles"]]) + [""])


def md_bound(b):
    n = b["in_flight"]
    rows = [[x["cache"], f"{x['ms_per_token']:.2f} ± {x['ms_per_token_ci95']:.2f}", f"{x['bound_ms']:.2f}",
             f"{x['ratio_to_bound']:.2f}", f"{x['bound_parallel_ms']:.2f}", f"{x['ratio_to_parallel_bound']:.2f}",
             f"{x['mb_per_token']:.3f}", f"{x['hit_rate']:.3f}"] for x in b["rows"]]
    return ([f"The engine against the physical bound (the base model, the same windows, plain routing): bound = "
             f"resident time per token ({b['resident_ms_per_token']:.2f} ± {b['resident_ms_per_token_ci95']:.2f} ms: "
             f"the same engine with every expert in slots) + MB read per token / disk bandwidth "
             f"({b['bandwidth_bytes_per_s'] / 1e6:.1f} MB/s for single experts read one at a time in random order, "
             f"{b['parallel_bandwidth_bytes_per_s'] / 1e6:.1f} MB/s with {n} in flight, as the engine reads a layer's "
             f"misses)" + (f"; {b['io_note']}" if b["io_note"] else "") + ":", ""]
            + table(["cache", "ms/token (95% CI)", "bound ms", "ratio", f"bound ms, {n} in flight", "ratio",
                     "MB read / token", "hit rate"], rows) + [""])


def md_free(f):
    rows = [[name, f"{m['loads_per_token']:.2f}", f"{m['hit_rate']:.3f}", f"{m['ms_per_token']:.2f}",
             f"{m['distinct_ratio']:.2f}"] for name, m in f["models"].items()]
    return ([f"Free generation (not a speedup: each model samples its own tokens), cache {f['capacity']}, temperature "
             f"{f['temperature']:g}, {f['prompts']} prompts x seeds {', '.join(map(str, f['seeds']))}, {f['new_tokens']} "
             f"tokens each, means over runs:", ""]
            + table(["model", "loads / token", "hit rate", "ms/token", "distinct tokens / generated"], rows) + [""])


def md_llama(r):
    lm = r["llama_memory"]
    out = ["## llama.cpp under a memory limit: the paper's measurement with the paper's runtime", ""]
    if "skipped" in lm:
        return out + [f"Skipped: {lm['skipped']}.", ""]
    s = lm["sizes"]
    out += [f"Both models exported to GGUF by export.py and evaluated by llama.cpp on the same {lm['tokens']} test "
            f"tokens, one per step, in a memory cgroup (cgroup v1) from a cold page cache, MADV_RANDOM on the "
            f"mapping; limit = llama.cpp's own memory ({lm['overhead_bytes'] / 1e6:.1f} MB, measured without a limit) + "
            f"the non-expert weights ({s['non_expert_bytes'] / 1e6:.2f} MB) + m x top-{s['top_k']} experts of "
            f"{s['expert_bytes'] / 1e3:.1f} KB per MoE layer ({s['moe_layers']} layers). Median of {lm['repeats']} "
            f"interleaved runs (range in brackets), {lm['threads']} thread(s), the first 16 tokens not counted.", ""]
    fmt = lambda v, r, scale, d: f"{v * scale:.{d}f} [{r[0] * scale:.{d}f}-{r[1] * scale:.{d}f}]" if v is not None else "failed"  # noqa: E731
    rows = [[f"{x['multiple']} x top-k", f"{x['limit_bytes'] / 1e6:.1f}", LABEL[x["model"]],
             fmt(x["time_per_token_s"], x["time_per_token_s_range"], 1e3, 2),
             fmt(x["majflt_per_token"], x["majflt_per_token_range"], 1, 1),
             fmt(x["bytes_read_per_token"], x["bytes_read_per_token_range"], 1e-3, 0)] for x in lm["rows"]]
    return out + table(["limit", "MB", "model", "ms/token", "major faults/token", "KB read/token"], rows) + [""]


def md_peers(r):
    p = r["peers"]
    out = ["## Peers: decoding with every expert resident (the base model's checkpoint, the same greedy tokens)", ""]
    if "skipped" in p:
        return out + [f"Skipped: {p['skipped']}.", ""]
    tps = p["tokens_per_s"]
    peers_ = [n for n in tps if n.startswith(("transformers", "llama.cpp"))]  # the columns: speed relative to each
    rows = [[name, f"{v:.1f}"] + [f"{v / tps[q]:.2f}x" for q in peers_]
            + [{True: "yes", False: "no"}.get(p["same_greedy_tokens"].get(name), "fed them")] for name, v in tps.items()]
    return (out + table(["decoder", "tokens/s"] + [f"vs {q.split(' (')[0]}" for q in peers_]
                        + ["its own greedy tokens equal"], rows)
            + ["", f"{p['new_tokens']} decode steps after a {p['prompt_tokens']}-token prompt (prefill excluded), "
                   f"{p['dtype']}, {p['threads']} thread(s), best of {p['repeats']}, interleaved; `--compile` compiled "
                   f"before the timed runs."
               + "".join(f" {n}." for n in p["notes"]), ""])


def markdown(r):
    """The report, from the results dictionary alone (so every figure in it is in results.json)."""
    m, d, env = r["model"], r["data"], r["environment"]
    out = [f"# ReMoE benchmark: `{m['base']}` vs `{m['tuned']}`", "",
           f"{m['model_type']}, {len(m['moe_layers'])} MoE layers x {m['n_routed_experts']} routed experts, "
           f"top-{m['num_experts_per_tok']}. Held-out text: test split of {d['source']} ({d['test_tokens']:,} "
           f"tokens), {d['windows']} windows x {d['seq_len']} tokens. {env['device']}, {env['dtype']}, "
           f"{env['threads']} CPU thread(s), torch {env['torch']}; measured in {r['wall_seconds']:.0f} s.", ""]
    for section in (md_summary, md_quality, md_reuse, md_cache_study, md_pareto, md_decode, md_llama, md_peers):
        out += section(r)
    return "\n".join(out)


STYLE = {"base": "--", "tuned": "-"}  # line style per model in every plot
COLOR = {"lru": "tab:blue", "lfu": "tab:green", "belady": "black"}


def plot_hit_rate(r, fig):
    """Hit rate against capacity: each policy for both models, Belady's optimum as the ceiling."""
    ax, cs = fig.subplots(), r["cache_study"]
    for pol in cache.POLICIES:
        for m in ("base", "tuned"):
            ax.plot(cs["capacities"], [x["hit_rate"] for x in cs[m][pol]], STYLE[m], color=COLOR[pol], marker="o",
                    ms=3, label=f"{POLICY_NAME[pol]}{' (optimum for this routing)' * (pol == 'belady')} {LABEL[m]}")
    ax.set(xlabel="experts cached per MoE layer", ylabel="hit rate", ylim=(0, 1.02), xticks=cs["capacities"],
           title="Expert-cache hit rate (cold start per window)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_pareto(r, fig):
    """Perplexity against hit rate, one panel per cache: every approach's points, its front drawn as a line."""
    caches = r["pareto"]["caches"]
    axes = np.atleast_1d(fig.subplots(1, len(caches), sharey=True))
    for ax, pa in zip(axes, caches):
        pareto_panel(ax, pa)
    axes[0].legend(fontsize=7)  # the same families in every panel


def pareto_panel(ax, pa):
    for i, (family, pts) in enumerate(pa["families"].items()):
        color = f"C{i}"
        ax.plot([p["hit_rate"] for p in pts], [p["perplexity"] for p in pts], "o", color=color, ms=4, alpha=0.6)
        front = pa["fronts"][family]
        ax.plot([p["hit_rate"] for p in front], [p["perplexity"] for p in front], "-", color=color, label=family)
        for p in pts:
            text = f"b{p['bias']:g}" if p["bias"] else f"m{p['margin']:g}" if "margin" in p else (
                f"λ{p['lambda']:g}" if "lambda" in p else "plain")
            ax.annotate(text, (p["hit_rate"], p["perplexity"]), xytext=(3, 3), textcoords="offset points",
                        fontsize=6, color=color)
    ax.axhline(pa["base_perplexity"], color="grey", lw=0.8, ls=":")
    ax.set(xlabel=f"LRU hit rate, {pa['capacity']} experts per MoE layer", ylabel="perplexity (lower is better)",
           title=f"Cache {pa['capacity']}: hit rate against perplexity")
    ax.grid(alpha=0.3)


def plot_decode_time(r, fig):
    """Mean ms per token of every decode contender at each capacity, with its 95% interval."""
    ax, rows = fig.subplots(), r["decode"]["rows"]
    for name in rows[0]["contenders"]:
        ms = [x["contenders"][name]["ms_per_token"] for x in rows]
        ci = [x["contenders"][name]["ms_per_token_ci95"] for x in rows]
        ax.errorbar([x["capacity"] for x in rows], ms, yerr=ci, marker="o", capsize=3,
                    ls=STYLE["tuned" if name.startswith("tuned") else "base"], label=name.replace("tuned", "ReMoE"))
    ax.set(xlabel="experts cached per MoE layer", ylabel="ms per token", xticks=[x["capacity"] for x in rows],
           title=f"Offloaded decoding, same tokens ({r['decode']['device']}, {r['decode']['io']} reads)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_latency(r, fig):
    """Predicted ms per token against the cache, one panel per device profile: base and ReMoE."""
    profiles = r["decode"]["latency"]["profiles"]
    axes = np.atleast_1d(fig.subplots(1, len(profiles)))
    for ax, p in zip(axes, profiles):
        caps = [x["capacity"] for x in p["rows"]]
        for m in ("base", "tuned"):
            ax.plot(caps, [x["ms_per_token"][m] for x in p["rows"]], STYLE[m], marker="o", label=LABEL[m])
        ax.set(xlabel="experts cached per MoE layer", xticks=caps)
        ax.set_title(p["name"].split(" + ")[0], fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted ms per token")
    axes[0].legend()


def plot_reuse(r, fig):
    """One panel per window w: base and ReMoE reuse rate side by side for every MoE layer."""
    ru = r["reuse"]
    axes = np.atleast_1d(fig.subplots(1, len(ru["windows"]), sharey=True))
    x = np.arange(len(ru["layers"]))
    for ax, w in zip(axes, ru["windows"]):
        for j, m in enumerate(("base", "tuned")):
            ax.bar(x + (j - 0.5) * 0.4, ru[m]["per_layer"][str(w)], 0.4, label=LABEL[m])
        ax.set_xticks(x, [str(layer) for layer in ru["layers"]])
        ax.set(xlabel="MoE layer", title=f"reuse, window w={w}")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("reuse rate")
    axes[0].legend()


def plots(r, out_dir):
    """The PNGs, drawn with matplotlib's object API (no pyplot, so no global state)."""
    from matplotlib.figure import Figure

    written = []
    panels = len(r["pareto"]["caches"])
    for name, draw, size in (("hit_rate.png", plot_hit_rate, (7, 4.5)), ("pareto.png", plot_pareto, (6 * panels, 5)),
                             ("decode_time.png", plot_decode_time, (6, 4)),
                             ("latency.png", plot_latency, (4.5 * len(r["decode"]["latency"]["profiles"]), 3.5)),
                             ("reuse_per_layer.png", plot_reuse, (4 * len(r["reuse"]["windows"]), 3.5))):
        fig = Figure(figsize=size)
        draw(r, fig)
        path = Path(out_dir) / name
        with cli.atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        written.append(str(path))
    return written


def write_outputs(results, traces, out_dir):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.to(torch.int16).numpy() for k, v in traces.items()}  # expert ids: (L, windows, T, K) each

    with cli.atomic_write(out_dir / "traces.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)  # a file object, so that numpy does not append .npz to the temp name
    results["files"] = {"traces": str(out_dir / "traces.npz"), "plots": plots(results, out_dir)}
    md = markdown(results)
    with cli.atomic_write(out_dir / "results.md") as tmp:
        tmp.write_text(md + "\n")
    cli.write_json(out_dir / "results.json", results)
    return md


RESULTS = Path(__file__).parent / "RESULTS.md"  # the repository's results, with its plots in results/


def is_default_run(s):
    """Only `python bench.py` as it is (default models and settings; device, threads and --out free)
    rewrites RESULTS.md, so that the repository's figures always come from one reproducible command."""
    free = dict(device=s.device, threads=s.threads, out=s.out)
    return replace(s, **free) == replace(Settings(), **free)


def write_results_md(results, md, path=RESULTS):
    """RESULTS.md: the report of a default run and its plots (copied beside it), with how it was made."""
    folder = path.parent / "results"
    folder.mkdir(exist_ok=True)
    images = []
    for plot in map(Path, results["files"]["plots"]):
        with cli.atomic_write(folder / plot.name) as tmp:
            tmp.write_bytes(plot.read_bytes())
        images.append(f"![{plot.stem}](results/{plot.name})")
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=path.parent, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    head = (f"<!-- written by `python bench.py` at commit {commit} on {time.strftime('%Y-%m-%d')}: rerun it, do not "
            f"edit. Every figure below is in {Path(results['files']['traces']).parent}/results.json of that run. -->")
    with cli.atomic_write(path) as tmp:
        tmp.write_text("\n".join([head, "", md, "", "## Plots", "", *images]) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    """Settings from the command line: a flag given wins, then --quick's value, then Settings' default."""
    d = Settings()

    def show(v):
        return " ".join(map(str, v)) if isinstance(v, (tuple, list)) else v

    def default(name):
        quick = f"; --quick: {show(QUICK[name])}" if name in QUICK else ""
        return f"(default: {show(getattr(d, name))}{quick})"

    def grid(name, extra=""):  # the capacity lists default to multiples of top-k
        quick = f"; --quick: top-k x {show(QUICK[name])}{extra}" if name in QUICK else ""
        return f"(default: top-k x {show(getattr(d, name))}{extra}{quick})"

    p = cli.ArgumentParser(description="Measure what ReMoE saves and costs against its base model and against "
                                            "cache-aware routing, in one run.")
    g = p.add_argument_group("models and data")
    g.add_argument("--base", help=f"base checkpoint folder {default('base')}")
    g.add_argument("--tuned", help=f"ReMoE-tuned checkpoint of the same architecture {default('tuned')}")
    g.add_argument("--data", help="held-out text: file, folder or .jsonl; its test split is used (default: the "
                                  "pinned default corpus, as train.py)")
    g.add_argument("--data-dir", help=f"token-id cache; files are keyed by corpus and tokenizer, so any model may "
                                      f"share it {default('data_dir')}")
    g.add_argument("--out", help=f"folder for results.md, results.json, traces.npz and the plots {default('out')}")
    g = p.add_argument_group("held-out windows (quality, reuse, cache study)")
    g.add_argument("--seq-len", type=int, help=f"tokens per window {default('seq_len')}")
    g.add_argument("--windows", type=int, help=f"test windows {default('windows')}")
    g.add_argument("--batch-size", type=int, help=f"windows per forward pass {default('batch_size')}")
    g.add_argument("--capacities", type=int, nargs="+", help="experts cached per MoE layer in the cache study "
                                                             + grid("capacity_multiples", ", and all experts"))
    g = p.add_argument_group("Pareto front (hit rate against perplexity at caches of m x top-k)")
    g.add_argument("--sweep", help=f"folder of `python train.py --sweep` runs, ANCHOR-lambdaX/remoe: ReMoE's front and "
                                   f"the lambda = 0 control {default('sweep')}")
    g.add_argument("--cache-bias", type=float, nargs="+",
                   help=f"cache-aware routing: bonus on cached experts' router scores, each value measured "
                        f"{default('cache_bias')}")
    g.add_argument("--pareto-keep", type=int, help=f"guaranteed cache-aware routing: each token's true top-J kept "
                                                   f"{default('pareto_keep')}")
    g.add_argument("--pareto-margins", type=float, nargs="+", help=f"guaranteed cache-aware routing: margins below "
                                                                   f"the K-th best router score, each value measured "
                                                                   f"{default('pareto_margins')}")
    g.add_argument("--pareto-multiples", type=float, nargs="+", help="the front's caches per MoE layer "
                                                                      + grid("pareto_multiples"))
    g.add_argument("--pareto-windows", type=int, help=f"first test windows of the front, decoded token by token for "
                                                      f"cache-aware routing {default('pareto_windows')}")
    g = p.add_argument_group("decode")
    g.add_argument("--decode-capacities", type=int, nargs="+", help="per-layer capacities for offloaded decoding "
                                                                    + grid("decode_multiples"))
    g.add_argument("--decode-windows", type=int, help=f"held-out windows every contender decodes, after one warm-up "
                                                      f"{default('decode_windows')}")
    g.add_argument("--decode-tokens", type=int, help=f"tokens fed one by one after each window's prompt "
                                                     f"{default('decode_tokens')}")
    g.add_argument("--decode-bias", type=float, help=f"cache-aware routing bias of the decode contenders "
                                                     f"{default('decode_bias')}")
    g.add_argument("--prompt-tokens", type=int, help=f"tokens prefilled at the start of each decode window "
                                                     f"{default('prompt_tokens')}")
    g.add_argument("--repeats", type=int, help=f"peers: timed runs per engine, the fastest is kept {default('repeats')}")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--threads", type=int, help="torch CPU threads, 0 for torch's choice; small models on a busy "
                                               f"machine often run faster with 1 {default('threads')}")
    g = p.add_argument_group("llama.cpp under memory limits")
    g.add_argument("--llama-multiples", type=float, nargs="+", help="limits leaving room for m x top-k experts per "
                                                                    f"MoE layer {default('llama_multiples')}")
    g.add_argument("--llama-tokens", type=int, help=f"test tokens evaluated per run {default('llama_tokens')}")
    g.add_argument("--llama-repeats", type=int, help=f"runs per model and limit, the median kept "
                                                     f"{default('llama_repeats')}")
    g.add_argument("--no-llama", dest="llama", action="store_false", default=None,
                   help="skip the llama.cpp measurement under memory limits")
    g.add_argument("--no-peers", dest="peers", action="store_false", default=None,
                   help="skip the comparison with transformers' generate")
    g.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="peers: leave out the compiled engine (torch.compile takes tens of seconds)")
    g.add_argument("--only", choices=("decode",), help="one section alone: `decode` runs the decode section (the "
                                                         "same-token table and the engine against its physical "
                                                         "bound) and writes decode.md and decode.json to --out")
    g.add_argument("--shape", choices=sorted(SHAPES), help="instead of the base/tuned study: a random checkpoint with "
                                                          "this published model's expert shapes and dtype, decoded "
                                                          "resident and offloaded against their bandwidth bounds")
    g.add_argument("--quick", action="store_true", default=None,
                   help="fewer windows, capacities and decode tokens, for a look in about a minute")
    args = p.parse_args(argv)
    s = replace(d, **QUICK) if args.quick else d
    return replace(s, **{f.name: getattr(args, f.name) for f in fields(Settings)
                         if getattr(args, f.name, None) is not None})


def main(argv=None):
    s = parse_args(argv)
    def log(msg):  # notes and progress go to stderr, the report to stdout
        print(msg, file=sys.stderr)

    with cli.user_errors(), cli.fatal_errors():
        cli.check_output(s.out, "--out", [] if s.shape else [s.base, s.tuned], folder=True)  # before the long study
        if s.shape:
            result = shape_study(s, s.shape, log)
            cli.write_json(Path(s.out) / f"shape-{s.shape}.json", result)
            print(f"wrote {Path(s.out) / f'shape-{s.shape}.json'}", file=sys.stderr)
            return result
        if s.only == "decode":
            results = decode_only(s, log)
            md = "\n".join(md_decode(results))
            with cli.atomic_write(Path(s.out) / "decode.md") as tmp:
                tmp.write_text(md + "\n")
            cli.write_json(Path(s.out) / "decode.json", results)
            print(md)
            print(f"\nwrote {Path(s.out) / 'decode.md'} and decode.json", file=sys.stderr)
            return results
        results, traces = run(s, log=log)
        md = write_outputs(results, traces, s.out)
        also = f" and {write_results_md(results, md)}" if is_default_run(s) else ""
    print(md)
    print(f"\nwrote {Path(s.out) / 'results.md'}, results.json, traces.npz and {len(results['files']['plots'])} plots"
          f"{also}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
