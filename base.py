"""
base.py: the testbed. A small DeepSeek-V2-style fine-grained MoE, pretrained on the Python standard
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
model.safetensors, tokenizer.json), so transformers loads it unchanged.

    python base.py                                       # build runs/default/base once (CPU), then report it
    python base.py --rebuild-base --pretrain-steps 50    # a quick, worse base model (for a look)
    python base.py --data notes/ --glob "**/*.md" --out runs/notes   # the same recipe on your own text
"""

import hashlib
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cache
import router
from data import DataConfig, eval_windows, prepare_data, random_batch, require_windows
from checkpoint import build_model, save_model
from cli import ArgumentParser, DEFAULT_RUN, UserError, atomic_write, remove_stale_temps, user_errors
from model import MoE

# ----------------------------------------------------------------------------------------------
# The default base model: small enough to pretrain on 2 CPU cores in about 5 minutes, shaped like
# DeepSeek-V2-Lite where it matters for caching: many small routed experts (32) and a top-k (4)
# eight times smaller, so a cache of 2 x top-k = 8 experts per layer holds a quarter of them
# (V2-Lite: 64 experts, top-6, a cache of 12 holds 19%). Chosen so that its quality depends on its
# routing, as a real MoE's does (the certificate below), measured against other designs:
#   - every layer is MoE: with a dense first layer (V2-Lite's first_k_dense_replace 1) a model this
#     briefly trained leans on that layer, and random routers elsewhere cost only +3% perplexity;
#   - one small shared expert (as wide as a routed one) and routed_scaling_factor 8: a softmax's
#     top-4 of 32 weighs ~0.3 in all, so without the factor the routed experts' output is too small
#     to learn fast; 8 lowered test perplexity 122 -> 115 at the old vocabulary and balanced the load;
#   - a 2,048-token vocabulary: the output head dominates the step's cost, so a small one buys 2.7x
#     the steps (450 of 8 x 256 tokens); bits per byte improved from 1.91 to 1.81.

DEFAULT_BASE = {
    "model_type": "deepseek_v2",
    "architectures": ["DeepseekV2ForCausalLM"],
    "hidden_size": 192,
    "num_hidden_layers": 5,            # all MoE
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
    "n_shared_experts": 1,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": False,
    "routed_scaling_factor": 8.0,
    "scoring_func": "softmax",
    "rope_theta": 10000.0,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def base_config(vocab_size, eot_id, overrides):
    """DEFAULT_BASE with --base-overrides applied and the tokenizer's vocabulary and separator."""
    return {**DEFAULT_BASE, **overrides, "vocab_size": vocab_size, "bos_token_id": eot_id, "eos_token_id": eot_id}


def init_weights(model, std=0.02):
    """GPT-2 style init: N(0, 0.02), norms at 1, residual output projections scaled by 1/sqrt(2L);
    except the token embeddings, N(0, 1): each coordinate at the scale of the normalised activations
    the layers add to them. With GPT-2's 0.02 the embeddings start ~50x smaller than the first layer's
    output, so the first MoE layer becomes the model's real embedding table (its output reached 30x
    the embedding's norm and drowned every later layer's: later layers' experts off cost +0% to +5%);
    at N(0, 1) test perplexity after 250 steps fell from 68 to 55 and later layers took a share."""
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
# The certificate: a testbed for routing methods must be able to fail one, so the model's quality
# must depend on its routing as a real MoE's does (DeepSeek-V2-Lite, Qwen or OLMoE are wrecked by a
# random router). Two ablations show it: random routers, and the routed experts switched off.

class NoRoutedExperts(nn.Module):
    """An experts provider (model.Experts' three methods) that provides no expert: the MoE layer then
    returns only its shared part (zero where there are no shared experts)."""

    def bonus(self):
        return None

    def fetch(self, indices, x):
        return iter(())

    def run(self, x, indices, weights):
        return torch.zeros_like(x)


def moe_layers(model, layers=None):
    """The MoE modules of the decoder layers in `layers` (None: all)."""
    return [b.mlp for b in model.model.layers if isinstance(b.mlp, MoE) and (layers is None or b.mlp.layer in layers)]


@contextmanager
def routed_experts_off(model, layers=None):
    """Within the block the MoE layers (all, or those in `layers`) run without their routed experts."""
    moes = moe_layers(model, layers)
    kept = [m.experts for m in moes]
    for m in moes:
        m.experts = NoRoutedExperts()
    try:
        yield model
    finally:
        for m, experts in zip(moes, kept):
            m.experts = experts


@contextmanager
@torch.no_grad()
def random_routers(model, seed, layers=None):
    """Within the block every router row (one expert's direction) of the MoE layers (all, or those in
    `layers`) is a random Gaussian row rescaled to the learned row's norm: the same score scale and
    spread, routing with no knowledge of the text."""
    gates = [m.gate for m in moe_layers(model, layers)]
    kept = [g.weight.detach().clone() for g in gates]
    gen = torch.Generator().manual_seed(seed)
    for g in gates:
        w = torch.randn(g.weight.shape, generator=gen, dtype=torch.float32)  # (E, D)
        g.weight.copy_(w * (g.weight.float().norm(dim=1, keepdim=True) / w.norm(dim=1, keepdim=True)))
    try:
        yield model
    finally:
        for g, w in zip(gates, kept):
            g.weight.copy_(w)


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
    for m in moe_layers(model):
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
# Resumable training: a state saved atomically every --save-every steps, resumed only by a run whose
# arguments would produce the same result (its "key": every flag that changes the result, by name).
# train.py saves and resumes its ReMoE stages with the same functions.

def digest(obj):
    """A short, stable hash of a JSON-able object: stands for a value too long to print in an error."""
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=8).hexdigest()


def corpus_identity(args, corpus):
    """What --data names, and a fingerprint of what was read there (so an edited corpus is not resumed)."""
    where = str(Path(args.data).resolve()) if args.data else "the Python stdlib"
    return f"{where} (corpus {corpus.fingerprint[:12]})"


def save_state(path, state):
    """torch.save through cli.atomic_write: a kill mid-save leaves the previous state whole."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_state(path, key, no_resume=False):
    """The state saved at `path` by a run with the same `key`; None when there is none or with
    --no-resume. A state saved with another key is refused, naming each differing flag: resuming it
    would silently mix two runs."""
    remove_stale_temps(path)  # what a process killed mid-save left beside it
    if no_resume or not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=False)  # our own file; it holds optimizer and RNG states
    except Exception as e:  # torch.load raises many kinds on a damaged file
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: unreadable training state ({why}); pass --no-resume to start over") from None
    if not isinstance(state, dict) or not isinstance(state.get("key"), dict):
        raise UserError(f"{path}: not a training state that this version of remoe wrote; "
                        "pass --no-resume to start over")
    saved = state["key"]
    differ = [f"{k}: {saved.get(k)!r} in the state, {key.get(k)!r} now" for k in {**key, **saved}
              if saved.get(k) != key.get(k)]
    if differ:
        raise UserError(f"{path} was saved by a run with other arguments ({'; '.join(differ)}); rerun with "
                        "the same arguments to resume it, or pass --no-resume to start over")
    return state


@contextmanager
def stop_on_interrupt():
    """Ctrl-C ends the program with one line that says how to resume, and status 130."""
    try:
        yield
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last saved state", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------
# Pretraining

def pretrain_key(args, corpus, config_dict):
    """Every argument that changes the pretrained weights, by flag."""
    return {"--data": corpus_identity(args, corpus), "--glob": args.glob, "--vocab-size": args.vocab_size,
            "--base-overrides": args.base_overrides, "base config": digest(config_dict),
            "--pretrain-steps": args.pretrain_steps, "--pretrain-lr": args.pretrain_lr,
            "--balance-coef": args.balance_coef, "--pretrain-batch-size": args.pretrain_batch_size, "--seq-len": args.seq_len,
            "--seed": args.seed}


def pretrain(args, corpus, data, state_file):
    """Next-token loss + switch balance loss, AdamW with warm-up and cosine decay, resumable.
    Returns (model, config dict, pretraining seconds over every process that worked on it,
    of which seconds of earlier processes)."""
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    config_dict = base_config(data.vocab_size, data.eot_id, args.base_overrides)
    model = build_model(config_dict)
    init_weights(model)
    E = model.config.n_routed_experts
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    step, earlier, gen = 0, 0.0, torch.Generator().manual_seed(args.seed)
    key = pretrain_key(args, corpus, config_dict)
    state = load_state(state_file, key, args.no_resume)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, earlier = state["step"], state["wall_seconds"]
        print(f"resuming pretraining at step {step} of {args.pretrain_steps} from {state_file}")

    def lr_at(s):  # linear warm-up, then cosine decay to 10%
        warm = max(1, args.pretrain_steps // 20)
        if s < warm:
            return args.pretrain_lr * (s + 1) / warm
        frac = (s - warm) / max(1, args.pretrain_steps - warm)
        return args.pretrain_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    tokens_per_step = args.pretrain_batch_size * args.seq_len
    with tqdm(total=args.pretrain_steps, initial=step, desc="pretrain base", unit="step", dynamic_ncols=True) as bar:
        while step < args.pretrain_steps:
            batch = random_batch(data.train, args.pretrain_batch_size, args.seq_len, gen)  # (B, T+1)
            logits, routing = model(batch[:, :-1], return_routing=True)
            lm = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            bal = router.balance_loss(routing, E, kind="switch")
            loss = lm + args.balance_coef * bal
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            rate = (step - bar.initial) * tokens_per_step / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{lm.item():.3f}", balance=f"{bal.item():.3f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
            if step % args.save_every == 0 and step < args.pretrain_steps:
                save_state(state_file, {"key": key, "step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                                        "gen": gen.get_state(), "wall_seconds": earlier + time.perf_counter() - started})
    model.eval()
    return model, config_dict, earlier + time.perf_counter() - started, earlier


def build_base(args, out_dir):
    """Pretrain the default base model, report its quality and routing, save it with the report."""
    t_start = time.perf_counter()
    context = {**DEFAULT_BASE, **args.base_overrides}["max_position_embeddings"]
    if args.seq_len > context:
        raise UserError(f"--seq-len {args.seq_len} is longer than the base model's context, max_position_embeddings "
                        f"{context}; expected at most that (or raise it with --base-overrides)")
    cfg = DataConfig(data=args.data, glob=args.glob, vocab_size=args.vocab_size)
    corpus, _, data = prepare_data(cfg, args.data_dir)
    require_windows(data, ("train", "test"), args.seq_len)
    print(f"corpus: {len(corpus.train)} train / {len(corpus.val)} val / {len(corpus.test)} test documents, "
          f"{len(data.train):,} / {len(data.val):,} / {len(data.test):,} tokens, vocab {data.vocab_size}")
    state_file = out_dir.with_name(out_dir.name + ".pretrain-state.pt")
    model, config_dict, wall, earlier = pretrain(args, corpus, data, state_file)
    capacity = 2 * model.config.num_experts_per_tok
    metrics, _ = evaluate(model, data.test, args.seq_len, args.eval_windows, cache_sizes=(capacity,))
    metrics["ablations"] = ablations(model, eval_windows(data.test, args.seq_len, args.eval_windows))
    uni = unigram_loss(data.train, data.test, data.vocab_size)
    results = {
        "config": {k: v for k, v in config_dict.items() if k != "architectures"},
        "pretrain": {"steps": args.pretrain_steps, "batch_size": args.pretrain_batch_size, "seq_len": args.seq_len,
                     "tokens": args.pretrain_steps * args.pretrain_batch_size * args.seq_len, "lr": args.pretrain_lr,
                     "balance_coef": args.balance_coef, "wall_seconds": round(wall, 1),
                     "total_seconds": round(earlier + time.perf_counter() - t_start, 1),
                     "threads": torch.get_num_threads()},
        "test": {**metrics, "unigram_loss": uni, "unigram_perplexity": math.exp(uni)},
    }
    save_model(model, out_dir, config_dict, files={"tokenizer.json": Path(args.data_dir) / "tokenizer.json",
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


def ensure_base(args):
    """The default base model in OUT/base: built when missing or with --rebuild-base, else reported."""
    out_dir = Path(args.out) / "base"
    if args.rebuild_base or not (out_dir / "config.json").is_file():
        return build_base(args, out_dir)
    print(f"using the default base model in {out_dir} (--rebuild-base to pretrain it again)")
    if (out_dir / "results.json").is_file():
        print_base_report(json.loads((out_dir / "results.json").read_text()))


# ----------------------------------------------------------------------------------------------
# Command line. train.py builds the base model when it is missing, so it takes these flags too:
# `add_flags` is the one place they and their defaults are declared.

def add_flags(p):
    g = p.add_argument_group("data")
    g.add_argument("--data", default=DataConfig.data,
                   help="text file, folder of text files or .jsonl with a 'text' field (default: the Python stdlib)")
    g.add_argument("--glob", default=DataConfig.glob, help="which files of a --data folder to read (default: %(default)s)")
    g.add_argument("--data-dir", default=None, help="token and tokenizer cache (default: OUT/data)")
    g.add_argument("--vocab-size", type=int, default=DataConfig.vocab_size,
                   help="vocabulary of the BPE tokenizer trained for the default base model (default: %(default)s)")
    g = p.add_argument_group("default base model")
    g.add_argument("--pretrain-steps", type=int, default=450, help="pretraining steps (default: %(default)s)")
    g.add_argument("--pretrain-batch-size", type=int, default=8, help="sequences per pretraining step "
                                                                      "(default: %(default)s)")
    g.add_argument("--pretrain-lr", type=float, default=6e-3, help="peak learning rate of pretraining (default: %(default)s)")
    g.add_argument("--balance-coef", type=float, default=0.3,
                   help="weight of the switch balance loss in pretraining; at 0.1 the busiest expert took 1.97x its "
                        "share in one layer (default: %(default)s)")
    g.add_argument("--base-overrides", default="{}",
                   help="JSON object overriding keys of DEFAULT_BASE, e.g. '{\"hidden_size\": 96}' (default: none)")
    g.add_argument("--rebuild-base", action="store_true", help="pretrain the base model again even if OUT/base exists")
    g = p.add_argument_group("batches and runs")
    g.add_argument("--batch-size", type=int, default=16,
                   help="sequences per ReMoE step (global across processes) (default: %(default)s)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    g.add_argument("--eval-windows", type=int, default=64, help="fixed test windows for evaluation (default: %(default)s)")
    g.add_argument("--save-every", type=int, default=50, help="steps between resumable training states (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--no-resume", action="store_true",
                   help="start over instead of resuming a saved training state (which must match these arguments)")


def prepare_flags(args):
    """Check the shared flags before any work (a UserError names the flag and what was expected),
    parse --base-overrides, apply --threads."""
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--pretrain-batch-size", args.pretrain_batch_size, 1),
                               ("--seq-len", args.seq_len, 1),
                               ("--eval-windows", args.eval_windows, 1), ("--save-every", args.save_every, 1),
                               ("--pretrain-steps", args.pretrain_steps, 1), ("--vocab-size", args.vocab_size, 257),
                               ("--threads", args.threads or 1, 1)):
        if value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    if not args.pretrain_lr > 0:
        raise UserError(f"--pretrain-lr must be > 0, got {args.pretrain_lr}")
    if not args.balance_coef >= 0:
        raise UserError(f"--balance-coef must be >= 0, got {args.balance_coef}")
    try:
        args.base_overrides = json.loads(args.base_overrides)
    except json.JSONDecodeError as e:
        raise UserError(f"--base-overrides is not valid JSON ({e.msg}); expected an object such as "
                        "'{\"hidden_size\": 96}'") from None
    if not isinstance(args.base_overrides, dict):
        raise UserError(f"--base-overrides must be a JSON object, got {type(args.base_overrides).__name__}")
    unknown = sorted(set(args.base_overrides) - set(DEFAULT_BASE))
    if unknown:
        raise UserError(f"--base-overrides key {unknown[0]!r} is not a key of DEFAULT_BASE (base.py)")
    if args.threads:
        torch.set_num_threads(args.threads)


def parse_args(argv=None):
    p = ArgumentParser(description="Build the default base model (a small DeepSeek-V2-style MoE pretrained "
                                            "on the Python stdlib) in OUT/base, or report it when it exists.")
    p.add_argument("--out", default=str(DEFAULT_RUN),
                   help="run folder: the model goes to OUT/base, the token cache to OUT/data (default: %(default)s)")
    add_flags(p)
    args = p.parse_args(argv)
    args.data_dir = Path(args.data_dir or Path(args.out) / "data")
    return args


def main(argv=None):
    args = parse_args(argv)
    with user_errors(), stop_on_interrupt():
        prepare_flags(args)
        ensure_base(args)


if __name__ == "__main__":
    main()
