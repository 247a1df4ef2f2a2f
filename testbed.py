"""
testbed.py: the testbed. A small DeepSeek-V2-style fine-grained MoE, pretrained on the Python standard
library's sources, so that ReMoE (train.py) has a trained base model to tune on any machine, with
no download.

What it teaches: ReMoE fine-tunes the routers of an already trained MoE, so its base model must
route like a real one. This one is shaped like DeepSeek-V2-Lite where it matters for caching (MLA
attention, MoE layers of many small routed experts plus a small shared expert) and pretrained with
next-token loss plus the switch-style load-balance loss (Fedus et al. 2021, eq. 4), so that its
experts are used about evenly, as a real model's are: an unbalanced router would make expert reuse
trivially high and the whole study meaningless. The report says how far it got: test perplexity
against a unigram baseline, expert load per layer, reuse rates, the hit rate of an LRU expert cache
(cache.py), and the certificate that its quality depends on its routing (random routers, routed
experts off; in all MoE layers and one layer at a time).

What it leaves out: everything that makes pretraining large (data mixtures, learning-rate search,
many processes); it runs in float32 on the CPU, in one process, in about 5 minutes on 2 cores.
The model is saved in the exact Hugging Face layout (config.json with model_type deepseek_v2,
model.safetensors, tokenizer.json), so transformers loads it unchanged. Its flags are train.py's:

    python train.py --base-only                                      # build runs/default/base once (CPU), report it
    python train.py --base-only --rebuild-base --pretrain-steps 50   # a quick, worse base model (for a look)
    python train.py --base-only --data notes/ --glob "**/*.md" --out runs/notes   # the same recipe on your text
"""

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cache
import router
from checkpoint import build_model, save_model
from cli import UserError, pick_device
from data import eval_windows, prepare_data, random_batch, require_windows
from resume import TrainingState, corpus_identity, digest

# ----------------------------------------------------------------------------------------------
# The default base model: pretrains on 2 CPU cores in minutes, and is shaped like DeepSeek-V2-Lite
# where it matters for caching: many small routed experts and a top-k eight times smaller, so that a
# cache of 2 x top-k experts per layer holds a quarter of them (V2-Lite: 64, top-6, 12 cached: 19%).
# The choices marked below make its quality depend on its routing (the certificate); NOTES.md has
# the measurements that chose them.

DEFAULT_BASE = {
    "model_type": "deepseek_v2",
    "architectures": ["DeepseekV2ForCausalLM"],
    "hidden_size": 192,
    "num_hidden_layers": 5,            # all MoE: a briefly trained model leans on a dense first layer
    "first_k_dense_replace": 0,
    "intermediate_size": 512,          # a dense layer's MLP (none by default)
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": None,               # as V2-Lite: one q_proj
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 32,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 64,
    "n_shared_experts": 1,             # one small shared expert, as wide as a routed one
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": False,
    "routed_scaling_factor": 8.0,      # a softmax's top-4 of 32 weighs ~0.3: scaled up, the experts learn fast
    "scoring_func": "softmax",
    "rope_theta": 10000.0,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


@dataclass
class PretrainConfig:
    steps: int = 450             # of batch_size x seq_len tokens (data.py's small vocabulary affords them)
    batch_size: int = 8          # sequences per step
    lr: float = 6e-3             # peak: linear warm-up over 5% of the steps, then cosine decay to 10%
    balance_coef: float = 0.3    # weight of the switch balance loss, so that the experts share the load
    overrides: dict = field(default_factory=dict)  # keys of DEFAULT_BASE to change
    # shared with ReMoE (train.py)
    seq_len: int = 256           # tokens per sequence
    eval_windows: int = 64       # fixed test windows of the report
    seed: int = 0
    save_every: int = 50         # steps between resumable states (resume.py)
    device: str | None = None    # None: cuda if available, else cpu


LOG_EVERY = 10  # steps between the progress bar's loss figures


def base_config(vocab_size, eot_id, overrides):
    """DEFAULT_BASE with `overrides` applied and the tokenizer's vocabulary and separator."""
    return {**DEFAULT_BASE, **overrides, "vocab_size": vocab_size, "bos_token_id": eot_id, "eos_token_id": eot_id}


def init_weights(model, std=0.02):
    """GPT-2 style init: N(0, 0.02), norms at 1, residual output projections scaled by 1/sqrt(2L); except
    the token embeddings, N(0, 1), at the scale of the normalised activations the layers add to them:
    with 0.02 the first MoE layer becomes the model's real embedding table and drowns the later ones."""
    L = model.config.num_hidden_layers
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p)
        elif name.endswith("embed_tokens.weight"):
            torch.nn.init.normal_(p, 0.0, 1.0)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, 0.0, std / math.sqrt(2 * L))
        else:
            torch.nn.init.normal_(p, 0.0, std)


# ----------------------------------------------------------------------------------------------
# Evaluation: loss, perplexity and routing on fixed windows (the same windows every run); train.py
# reports every ReMoE stage with it too

@torch.no_grad()
def evaluate(model, tokens, seq_len=256, max_windows=64, batch_size=8, cache_sizes=()):
    """Mean next-token loss over fixed test windows, router.py's routing report on them, and the hit
    rate of a per-layer LRU cache of each of `cache_sizes` experts (cache.py, cold start per window)."""
    windows = eval_windows(tokens, seq_len, max_windows)  # (W, T+1)
    loss, routing = windows_loss(model, windows, batch_size, with_routing=True)
    report = router.routing_report(routing, model.config.n_routed_experts, windows=(1, 2, 4))
    traces = cache.token_traces(routing)  # one trace per window: each starts with empty caches
    report["lru_hit_rate"] = {c: cache.simulate(traces, "lru", c).hit_rate for c in cache_sizes}
    metrics = {"loss": loss, "perplexity": math.exp(loss), "tokens": windows[:, 1:].numel(), **report}
    return json.loads(json.dumps(metrics)), routing  # JSON-shaped (string keys), as results.json holds it


@torch.no_grad()
def windows_loss(model, windows, batch_size=8, with_routing=False):
    """Mean next-token loss of `model` on windows (W, T+1) and, on request, every MoE layer's routing
    over all of them (indices, weights (W, T, K), scores (W, T, E) per layer)."""
    device = next(model.parameters()).device
    total, routing_all = 0.0, []
    for chunk in windows.to(device).split(batch_size):
        logits, routing = model(chunk[:, :-1], return_routing=True)
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").item()
        if with_routing:
            routing_all.append(routing)
    loss = total / windows[:, 1:].numel()
    if not with_routing:
        return loss
    routing = [r._replace(indices=torch.cat([b[i].indices for b in routing_all]),  # (W, T, K)
                          weights=torch.cat([b[i].weights for b in routing_all]),  # (W, T, K)
                          scores=torch.cat([b[i].scores for b in routing_all]))    # (W, T, E)
               for i, r in enumerate(routing_all[0])]
    return loss, routing


# ----------------------------------------------------------------------------------------------
# A routing method's report: each test report against the base model's (train.py's stages)

def print_change(name, r, base_report):
    """One line: the test report `r` of the model called `name` against the base model's."""
    capacity, hit = next(iter(r["lru_hit_rate"].items()))
    rel = r["reuse"]["1"] / base_report["reuse"]["1"] - 1
    print(f"[{name}] test ppl {r['perplexity']:.2f} ({r['perplexity'] / base_report['perplexity'] - 1:+.2%}), "
          f"reuse w=1 {r['reuse']['1']:.3f} ({rel:+.1%}), load max/mean {max(r['load_max_over_mean']):.2f}, "
          f"LRU hit @{capacity} {hit:.3f}")


def summary(reports):
    """The base model's report ("0 base") of {model name: test report} against the last one."""
    first, final = reports["0 base"], reports[list(reports)[-1]]
    capacity = next(iter(first["lru_hit_rate"]))
    return {"perplexity_base": first["perplexity"], "perplexity_tuned": final["perplexity"],
            "perplexity_change": final["perplexity"] / first["perplexity"] - 1,
            "reuse_base": first["reuse"]["1"], "reuse_tuned": final["reuse"]["1"],
            "reuse_change": final["reuse"]["1"] / first["reuse"]["1"] - 1,
            "load_max_over_mean_base": max(first["load_max_over_mean"]),
            "load_max_over_mean_tuned": max(final["load_max_over_mean"]),
            "lru_cache": capacity, "lru_hit_base": first["lru_hit_rate"][capacity],
            "lru_hit_tuned": final["lru_hit_rate"][capacity]}


def print_summary(s):
    print(f"reuse (w=1) {s['reuse_base']:.3f} -> {s['reuse_tuned']:.3f} ({s['reuse_change']:+.1%}), "
          f"perplexity {s['perplexity_base']:.2f} -> {s['perplexity_tuned']:.2f} ({s['perplexity_change']:+.2%}), "
          f"load max/mean {s['load_max_over_mean_base']:.2f} -> {s['load_max_over_mean_tuned']:.2f}, "
          f"LRU hit @{s['lru_cache']} {s['lru_hit_base']:.3f} -> {s['lru_hit_tuned']:.3f}")


def sweep_dir(out, anchor, lam, reuse_set="window", routing=""):
    """Where --sweep puts the run of one reuse weight (bench.py finds them there for its Pareto front)."""
    routed = "-" + routing.replace(":", "") if routing else ""  # trained under cache-aware routing, e.g. -bias0.05
    return Path(out) / "sweep" / f"{anchor}{'-cache' if reuse_set == 'cache' else ''}{routed}-lambda{lam:g}"


def print_sweep(rows):
    """Reuse against quality, one row per (reuse weight, summary)."""
    print("\nlambda  reuse w=1  change   perplexity  change   load max/mean  LRU hit")
    for lam, s in rows:
        print(f"{lam:6g}  {s['reuse_tuned']:9.3f}  {s['reuse_change']:+6.1%}  {s['perplexity_tuned']:10.2f}  "
              f"{s['perplexity_change']:+6.2%}  {s['load_max_over_mean_tuned']:13.2f}  {s['lru_hit_tuned']:7.3f}")


# ----------------------------------------------------------------------------------------------
# Other routers in the same network: the certificate's random routers, and train.py's base model pass

@contextmanager
@torch.no_grad()
def router_weights(model, weights):
    """Within the block the routers of the MoE layers in `weights` ({layer: (E, D) tensor}) hold those
    weights; their own come back after it. One network serves as two models, with no second copy."""
    gates = {m.layer: m.gate for m in model.moes() if m.layer in weights}
    kept = {l: g.weight.detach().clone() for l, g in gates.items()}
    for l, g in gates.items():
        g.weight.copy_(weights[l])
    try:
        yield model
    finally:
        for l, g in gates.items():
            g.weight.copy_(kept[l])


# ----------------------------------------------------------------------------------------------
# The certificate: a testbed for routing methods must be able to fail one, so the model's quality
# must depend on its routing as a real MoE's does (DeepSeek-V2-Lite, Qwen or OLMoE are wrecked by a
# random router). Two ablations show it: random routers, and the routed experts switched off.

class NoRoutedExperts(nn.Module):
    """An experts provider (model.Experts' three methods) that provides no expert: the MoE layer then
    returns only its shared part (zero where there are no shared experts)."""

    def steer(self):
        return {}

    def fetch(self, indices, x):
        return iter(())

    def run(self, x, indices, weights):
        return torch.zeros_like(x)


def chosen_moes(model, layers=None):
    """The MoE layers among `layers` (None: all)."""
    return [m for m in model.moes() if layers is None or m.layer in layers]


@contextmanager
def routed_experts_off(model, layers=None):
    """Within the block the MoE layers (all, or those in `layers`) run without their routed experts."""
    moes = chosen_moes(model, layers)
    kept = [m.experts for m in moes]
    for m in moes:
        m.experts = NoRoutedExperts()
    try:
        yield model
    finally:
        for m, experts in zip(moes, kept):
            m.experts = experts


@contextmanager
def random_routers(model, seed, layers=None):
    """Within the block every router row (one expert's direction) of the MoE layers (all, or those in
    `layers`) is a random Gaussian row rescaled to the learned row's norm: the same score scale and
    spread, routing with no knowledge of the text."""
    gen, weights = torch.Generator().manual_seed(seed), {}
    for m in chosen_moes(model, layers):
        learned = m.gate.weight.detach()
        w = torch.randn(learned.shape, generator=gen, dtype=torch.float32).to(learned.device)  # (E, D), same draw anywhere
        weights[m.layer] = w * (learned.float().norm(dim=1, keepdim=True) / w.norm(dim=1, keepdim=True))
    with router_weights(model, weights):
        yield model


def ablations(model, windows, seeds=(0, 1, 2), batch_size=8):
    """Perplexity on windows (W, T+1) with the learned routers, with random routers (the mean
    perplexity over `seeds`), and with the routed experts off; each ablation's relative change; and
    both ablations one MoE layer at a time (random routers with the first seed), since a method that
    changes routing everywhere is only tested where routing matters."""
    def ppl():
        return math.exp(windows_loss(model, windows, batch_size))

    learned, per_seed, per_layer = ppl(), [], {}
    for seed in seeds:
        with random_routers(model, seed):
            per_seed.append(ppl())
    with routed_experts_off(model):
        off = ppl()
    for m in model.moes():
        with random_routers(model, seeds[0], layers=[m.layer]):
            rr = ppl()
        with routed_experts_off(model, layers=[m.layer]):
            ro = ppl()
        per_layer[str(m.layer)] = {"random_router_change": rr / learned - 1, "routed_experts_off_change": ro / learned - 1}
    random = sum(per_seed) / len(per_seed)
    return {"learned": learned, "random_router": random, "random_router_seeds": per_seed, "routed_experts_off": off,
            "random_router_change": random / learned - 1, "routed_experts_off_change": off / learned - 1,
            "per_layer": per_layer}


def print_ablations(a, where="test"):
    print(f"certificate ({where} perplexity): learned routers {a['learned']:.1f} | random routers "
          f"{a['random_router']:.1f} ({a['random_router_change']:+.0%}) | routed experts off "
          f"{a['routed_experts_off']:.1f} ({a['routed_experts_off_change']:+.0%})")
    if "per_layer" in a:
        print("  one MoE layer at a time:  " + "  ".join(
            f"layer {l}: {x['random_router_change']:+.0%} / {x['routed_experts_off_change']:+.0%}"
            for l, x in a["per_layer"].items()) + "  (random routers / experts off)")


def unigram_loss(train, test, vocab_size):
    """Cross-entropy of the test split under token frequencies of the train split (add-one smoothed):
    the loss of a model that ignores context, the baseline a language model must beat."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(test)].mean())


# ----------------------------------------------------------------------------------------------
# Pretraining: loss = next-token loss + balance_coef * switch balance loss, resumable (resume.py)

def pretrain_key(cfg, data_cfg, corpus, config_dict):
    """Every setting that changes the pretrained weights, by flag."""
    return {"--data": corpus_identity(data_cfg.data, corpus), "--glob": data_cfg.glob,
            "--vocab-size": data_cfg.vocab_size, "--base-overrides": cfg.overrides, "base config": digest(config_dict),
            "--pretrain-steps": cfg.steps, "--pretrain-lr": cfg.lr, "--balance-coef": cfg.balance_coef,
            "--pretrain-batch-size": cfg.batch_size, "--seq-len": cfg.seq_len, "--seed": cfg.seed,
            "--device": str(device_of(cfg)[0].type)}


def lr_at(cfg, step):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    warm = max(1, cfg.steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def device_of(cfg):
    """(device, reason): pretraining computes in float32 wherever it runs (the checkpoint's dtype)."""
    return pick_device(cfg.device)


def pretrain(cfg, data_cfg, corpus, data, state_file, fresh=False):
    """AdamW with warm-up and cosine decay. Returns (model, config dict, pretraining seconds over every
    process that worked on it, of which seconds of earlier processes)."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    config_dict = base_config(data.vocab_size, data.eot_id, cfg.overrides)
    model = build_model(config_dict)
    init_weights(model)  # on the CPU, so that a seed draws the same weights on any device
    device, why = device_of(cfg)
    model.to(device)
    print(f"pretraining on {device} ({why}), float32")
    E = model.config.n_routed_experts
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    state = TrainingState(state_file, pretrain_key(cfg, data_cfg, corpus, config_dict), fresh=fresh, started=started)
    saved = state.resume(model.state_dict(), opt, gen)
    step = saved["step"] if saved else 0
    if saved:
        print(f"resuming pretraining at step {step} of {cfg.steps} from {state_file}")
    model.train()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    with tqdm(total=cfg.steps, initial=step, desc="pretrain base", unit="step", dynamic_ncols=True) as bar:
        while step < cfg.steps:
            batch = random_batch(data.train, cfg.batch_size, cfg.seq_len, gen).to(device)  # (B, T+1)
            logits, routing = model(batch[:, :-1], return_routing=True)      # (B, T, V)
            lm = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            bal = router.balance_loss(routing, E, kind="switch")
            loss = lm + cfg.balance_coef * bal
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            state.watch(lm, bal)  # a NaN stops the run at the next check, before anything is saved
            if step % LOG_EVERY == 0 or step == cfg.steps:  # reading the losses waits for the device: not every step
                state.check(step=step)
                rate = (step - bar.initial) * tokens_per_step / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{lm.item():.3f}", balance=f"{bal.item():.3f}", tok_s=f"{rate:,.0f}")
            if step % cfg.save_every == 0 and step < cfg.steps:
                state.save(step=step)
    model.eval()
    return model, config_dict, state.seconds(), state.earlier


def build_base(cfg, data_cfg, out_dir, data_dir, fresh=False):
    """Pretrain the default base model, report its quality and routing, save it with the report."""
    t_start = time.perf_counter()
    context = {**DEFAULT_BASE, **cfg.overrides}["max_position_embeddings"]
    if cfg.seq_len > context:
        raise UserError(f"--seq-len {cfg.seq_len} is longer than the base model's context, max_position_embeddings "
                        f"{context}; expected at most that (or raise it with --base-overrides)")
    corpus, _, data = prepare_data(data_cfg, data_dir)
    require_windows(data, ("train", "test"), cfg.seq_len)
    print(f"corpus: {len(corpus.train)} train / {len(corpus.val)} val / {len(corpus.test)} test documents, "
          f"{len(data.train):,} / {len(data.val):,} / {len(data.test):,} tokens, vocab {data.vocab_size}")
    state_file = out_dir.with_name(out_dir.name + ".pretrain-state.pt")
    model, config_dict, wall, earlier = pretrain(cfg, data_cfg, corpus, data, state_file, fresh)
    capacity = 2 * model.config.num_experts_per_tok
    metrics, _ = evaluate(model, data.test, cfg.seq_len, cfg.eval_windows, cache_sizes=(capacity,))
    metrics["ablations"] = ablations(model, eval_windows(data.test, cfg.seq_len, cfg.eval_windows))
    uni = unigram_loss(data.train, data.test, data.vocab_size)
    results = {
        "config": {k: v for k, v in config_dict.items() if k != "architectures"},
        "pretrain": {"steps": cfg.steps, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                     "tokens": cfg.steps * cfg.batch_size * cfg.seq_len, "lr": cfg.lr,
                     "balance_coef": cfg.balance_coef, "wall_seconds": round(wall, 1),
                     "total_seconds": round(earlier + time.perf_counter() - t_start, 1),
                     "threads": torch.get_num_threads()},
        "test": {**metrics, "unigram_loss": uni, "unigram_perplexity": math.exp(uni)},
    }
    save_model(model, out_dir, config_dict, files={"tokenizer.json": Path(data_dir) / "tokenizer.json",
                                                   "results.json": json.dumps(results, indent=2) + "\n"})
    state_file.unlink(missing_ok=True)  # the finished checkpoint replaces the resumable state
    print_base_report(results)
    return results


def print_base_report(results):
    t, p = results["test"], results["pretrain"]
    print(f"\nbase model: pretrained {p['tokens']:,} tokens in {p['wall_seconds']:.0f}s "
          f"({p['total_seconds']:.0f}s with data preparation)")
    print(f"test loss {t['loss']:.3f} (perplexity {t['perplexity']:.1f}) vs unigram {t['unigram_loss']:.3f} "
          f"(perplexity {t['unigram_perplexity']:.1f})")
    print("layer  load max/mean  load CV  reuse(w=1)")
    for layer, mm, cv, reuse in zip(t["layers"], t["load_max_over_mean"], t["load_cv"], t["reuse_per_layer"]["1"]):
        print(f"{layer:5d}  {mm:13.2f}  {cv:7.2f}  {reuse:10.3f}")
    capacity, hit = next(iter(t["lru_hit_rate"].items()))
    print(f"reuse rate (w=1) {t['reuse']['1']:.3f}, LRU hit rate at cache {capacity}: {hit:.3f}")
    if "ablations" in t:
        print_ablations(t["ablations"])


def ensure_base(cfg, data_cfg, out_dir, data_dir, rebuild=False, fresh=False):
    """The default base model in out_dir: built when missing or when `rebuild`, else reported."""
    out_dir = Path(out_dir)
    if rebuild or not (out_dir / "config.json").is_file():
        return build_base(cfg, data_cfg, out_dir, data_dir, fresh)
    print(f"using the default base model in {out_dir} (--rebuild-base to pretrain it again)")
    if (out_dir / "results.json").is_file():
        print_base_report(json.loads((out_dir / "results.json").read_text()))
