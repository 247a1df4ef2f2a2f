"""
train.py: ReMoE, router-only fine-tuning that teaches a fine-grained MoE to reuse the experts that the
last few tokens used, so that a device holding only a few experts per layer loads far fewer of them
from storage.

What it teaches: only the routers (`gate.weight` of every MoE layer) are trained, with

    loss = next-token loss + lambda * reuse loss + beta * balance loss + gamma * anchor

- the reuse loss (router.py) moves router probability onto the experts of the previous w tokens;
- the balance loss is switch-style over the whole batch (Fedus et al. 2021): reuse asks consecutive
  tokens of one sequence to share experts, which DeepSeek's per-sequence loss directly penalises,
  while a batch-level loss only asks that different sequences spread over all experts;
- the anchor keeps the tuned model near the base model, in one of two ways (--anchor): "distill",
  KL(base model's next-token distribution || tuned model's), a distillation (Hinton et al. 2015) that
  constrains the predictions and leaves the routers free to pick other experts that predict as well;
  or "router-kl", the paper's Trust-KL: KL(base router's distribution || tuned router's) per token
  and layer, penalised only beyond a margin (--kl-margin), a trust region around the original
  routing. Both need the base model on the same tokens: this network with the original router
  weights copied in for one no-grad forward per step, so no second model is held in memory;
- three stages: (1) reuse-aware; (2) balance, beta x 4 while reuse is still rewarded; (3) calibration
  on held-out text with lambda annealed to 0, so quality recovers.
The tuned model is the base checkpoint with only its router tensors replaced: same architecture, same
cost, loads wherever the base loads. Under torchrun, data parallel (DDP over the routers, or FSDP2
sharding the frozen model with --fsdp) gives the routers that one process gives on the same global batch.

What it leaves out: training anything but the routers, DeepSeek-V3's bias-update balancing rule (its
e_score_correction_bias stays as it is), pipeline and tensor parallelism. With no --model it tunes the
default base model (base.py), built first when it is missing.

    python train.py                                     # the default base model (built first if missing), CPU
    python train.py --model DIR --data PATH             # your own checkpoint and text
    torchrun --nproc_per_node 2 train.py --model DIR    # data parallel; add --fsdp to shard the frozen model
"""

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import base
import cache
import router
from data import DataConfig, prepare_data, random_batch, require_windows
from checkpoint import disk_name, load_model, read_config, stored_dtype
from cli import ArgumentParser, DEFAULT_RUN, UserError, atomic_write, pick_device, pick_dtype, user_errors

# ----------------------------------------------------------------------------------------------
# What is trained, and the anchor it is held to

def moe_gates(model):
    """The router (Gate module) of every MoE layer."""
    return [model.model.layers[l].mlp.gate for l in model.config.moe_layers]


def router_parameters(model):
    """Freeze every parameter except the MoE routers' (`gate.weight`); return the routers.
    DeepSeek-V3's e_score_correction_bias is a buffer set by a balancing rule, not by gradients
    (it only shifts which experts are chosen, so no gradient reaches it): it stays as it is."""
    for p in model.parameters():
        p.requires_grad_(False)
    gates = moe_gates(model)
    for g in gates:
        g.weight.requires_grad_(True)
    return gates


@torch.no_grad()
def base_model_pass(model, gates, base_weights, inputs):
    """The base model's (logits, routing) on `inputs`: the same network with the original router
    weights copied in for one forward pass."""
    tuned = [g.weight.detach().clone() for g in gates]
    for g, w in zip(gates, base_weights):
        g.weight.copy_(w)
    logits, routing = model(inputs, return_routing=True)
    for g, w in zip(gates, tuned):
        g.weight.copy_(w)
    return logits, routing


def anchor_loss(args, logits, routing, base_logits, base_routing):
    """The anchor that holds the tuned model near the base model (see the docstring at the top)."""
    if args.anchor == "distill":
        return F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(base_logits.float(), -1),
                        log_target=True, reduction="none").sum(-1).mean()
    return router.router_kl_loss(base_routing, routing, args.kl_margin)


# ----------------------------------------------------------------------------------------------
# The three stages, resumable: a state saved every --save-every steps (base.save_state), resumed only
# by a run with the same key (base.load_state), i.e. the same arguments and the same base model

def stage_plan(args):
    """The three stages: (name, steps, split, reuse weight at stage fraction f, balance weight)."""
    s1, s2, s3 = args.stage_steps
    lam, beta = args.reuse_weight, args.balance_weight
    return [
        ("1 reuse-aware", s1, "train", lambda f: lam, beta),
        # the balance term stays in force; here it is tightened while reuse is still rewarded
        ("2 balance", s2, "train", lambda f: lam, beta * args.balance_boost),
        # calibration on held-out text: the reuse weight anneals to zero so quality recovers
        ("3 calibration", s3, args.calib_split, lambda f: lam * (1 - f), beta),
    ]


def base_identity(model_dir, gates):
    """The base checkpoint as a resume sees it: its folder, and a digest of its config.json, tokenizer.json
    and router tensors (another base model, even one pretrained with another seed, has other routers)."""
    h = hashlib.blake2b(digest_size=8)
    for name in ("config.json", "tokenizer.json"):
        f = Path(model_dir) / name
        h.update(f.read_bytes() if f.is_file() else b"")
    for g in gates:
        h.update(g.weight.detach().cpu().contiguous().view(torch.uint8).numpy())  # the raw bytes, any dtype
    return f"{Path(model_dir).resolve()} ({h.hexdigest()})"


def remoe_key(args, base_id, corpus, compute, world):
    """Every argument that changes the tuned routers, by flag: a saved state must match all of them."""
    return {"--model": base_id, "--data": base.corpus_identity(args, corpus), "--glob": args.glob,
            "--device": compute, "processes (torchrun)": world, "--fsdp": args.fsdp,
            "--reuse-weight": args.reuse_weight, "--window": args.window, "--balance": args.balance,
            "--reuse-set": args.reuse_set, "--reuse-cache": args.reuse_cache,
            "--balance-weight": args.balance_weight, "--balance-boost": args.balance_boost,
            "--anchor": args.anchor, "--anchor-weight": args.anchor_weight,
            "--kl-margin": args.kl_margin if args.anchor == "router-kl" else None, "--lr": args.lr, "--stage-steps": list(args.stage_steps),
            "--calib-split": args.calib_split, "--batch-size": args.batch_size, "--seq-len": args.seq_len,
            "--eval-windows": args.eval_windows, "--seed": args.seed}


def finetune(args, model, data, out_dir, *, procs, key, started):
    """Run the three stages and evaluate after each. Returns (reports, state file, seconds that earlier
    processes spent on this run before the state it resumed was saved)."""
    gates = moe_gates(model)
    base_weights = [g.weight.detach().clone() for g in gates]
    opt = torch.optim.AdamW([g.weight for g in gates], lr=args.lr, weight_decay=0.0)
    E, capacity = model.config.n_routed_experts, 2 * model.config.num_experts_per_tok
    device = next(model.parameters()).device
    # one state file per process: under FSDP each holds its own shard of the routers and optimizer
    suffix = ".train-state.pt" if procs.world == 1 else f".train-state.rank{procs.rank}.pt"
    state_file = out_dir.with_name(out_dir.name + suffix)
    gen = torch.Generator().manual_seed(args.seed)
    plan = stage_plan(args)
    stage_i, step, reports, earlier = 0, 0, {}, 0.0
    # under torchrun the switch loss counts experts over the whole global batch, as one process does
    reduce = sum_over_processes if procs.world > 1 and args.balance == "switch" else None

    def save(stage, step):
        base.save_state(state_file, {"key": key, "stage": stage, "step": step, "reports": reports,
                                     "routers": [g.weight.detach().clone() for g in gates], "opt": opt.state_dict(),
                                     "gen": gen.get_state(), "wall_seconds": earlier + time.perf_counter() - started})

    def evaluate_stage(name):  # every process evaluates: FSDP's forward needs them all
        reports[name] = base.evaluate(model, data.test, args.seq_len, args.eval_windows, cache_sizes=(capacity,))[0]
        if procs.rank == 0:
            print_stage(name, reports[name], reports["0 base"])

    state = base.load_state(state_file, key, args.no_resume)
    if state is not None:
        with torch.no_grad():
            for g, w in zip(gates, state["routers"]):
                g.weight.copy_(w)
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        stage_i, step, reports, earlier = state["stage"], state["step"], state["reports"], state["wall_seconds"]
        if procs.rank == 0:
            where = (f"all {len(plan)} stages done, exporting" if stage_i == len(plan)
                     else f"resuming stage {plan[stage_i][0]} at step {step} of {plan[stage_i][1]}")
            print(f"{where} (saved state {state_file})")
    if "0 base" not in reports:
        evaluate_stage("0 base")
    per_rank = args.batch_size // procs.world
    for i in range(stage_i, len(plan)):
        name, steps, split, lam_at, beta = plan[i]
        tokens = getattr(data, split)
        model.train()
        with tqdm(total=steps, initial=step, desc=f"stage {name}", unit="step", dynamic_ncols=True,
                  disable=procs.rank != 0) as bar:
            while step < steps:
                batch = random_batch(tokens, args.batch_size, args.seq_len, gen)  # (B, T+1), the same on every rank
                batch = batch[procs.rank * per_rank:(procs.rank + 1) * per_rank].to(device)  # (B/world, T+1): this rank's share
                inputs, targets = batch[:, :-1], batch[:, 1:]
                lam = lam_at(step / max(1, steps))
                # the base model's pass first: it swaps router weights in place, which the tuned pass's graph may not see
                base_pass = base_model_pass(model, gates, base_weights, inputs) if args.anchor_weight else None
                logits, routing = procs.model(inputs, return_routing=True)
                lm = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                recent = None  # R_t: the last --window tokens' experts, or what the device's cache holds
                if args.reuse_set == "cache":
                    recent = [cache.cached_before(r.indices, args.reuse_cache or capacity, E) for r in routing]
                reuse = router.reuse_loss(routing, window=args.window, recent=recent)
                bal = router.balance_loss(routing, E, kind=args.balance, reduce=reduce)
                loss = lm + lam * reuse + beta * bal
                if base_pass is not None:
                    loss = loss + args.anchor_weight * anchor_loss(args, logits, routing, *base_pass)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.set_postfix(lm=f"{lm.item():.3f}", reuse=f"{reuse.item():.3f}", bal=f"{bal.item():.3f}")
                bar.update(1)
                if step % args.save_every == 0 and step < steps:
                    save(i, step)
        model.eval()
        evaluate_stage(name)
        save(i + 1, 0)
        step = 0
    return reports, state_file, earlier


def print_stage(name, r, base_report):
    capacity, hit = next(iter(r["lru_hit_rate"].items()))
    rel = r["reuse"]["1"] / base_report["reuse"]["1"] - 1
    print(f"[{name}] test ppl {r['perplexity']:.2f} ({r['perplexity'] / base_report['perplexity'] - 1:+.2%}), "
          f"reuse w=1 {r['reuse']['1']:.3f} ({rel:+.1%}), load max/mean {max(r['load_max_over_mean']):.2f}, "
          f"LRU hit @{capacity} {hit:.3f}")


# ----------------------------------------------------------------------------------------------
# Exporting the tuned model: the base checkpoint with only the router tensors replaced

def full_tensor(t):
    """The whole tensor, also from an FSDP2-sharded parameter (a DTensor; gathering is collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def export_tuned(base_dir, out_dir, cfg, routers, results):
    """Write out_dir atomically (cli.atomic_write): every file of base_dir hard-linked (or copied),
    except the safetensors files that hold router tensors, which are rewritten with the tuned routers
    in the checkpoint's own dtype. Names, shapes, shards and the index stay exactly as they were."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    routers = {disk_name(cfg, f"model.layers.{l}.mlp.gate.weight"): w for l, w in routers.items()}
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = {name: "model.safetensors" for name in routers}
    to_rewrite = {weight_map[name] for name in routers}
    with atomic_write(out_dir) as tmp:
        tmp.mkdir()
        for f in sorted(base_dir.iterdir()):
            if not f.is_file() or f.name == "results.json":
                continue
            if f.name in to_rewrite:
                tensors = {}
                with safe_open(f, framework="pt") as st:
                    metadata = st.metadata()
                    for name in st.keys():
                        t = st.get_tensor(name)
                        tensors[name] = routers[name].to(t.dtype).contiguous() if name in routers else t
                save_file(tensors, tmp / f.name, metadata=metadata)
                (tmp / f.name).chmod(0o644)  # safetensors creates files readable by their owner only
            else:
                try:
                    os.link(f, tmp / f.name)  # same bytes, no copy: the tuned model costs only its routers
                except OSError:
                    shutil.copyfile(f, tmp / f.name)
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Data parallel (torchrun): DDP over the routers, or FSDP2 sharding the frozen model

class Processes(NamedTuple):
    rank: int
    world: int
    model: torch.nn.Module  # what the training step calls: the model, or its DDP / FSDP wrapper


def under_torchrun():
    return "WORLD_SIZE" in os.environ  # torchrun tells each process its place through the environment


def process_device(requested):
    """(device, reason) from cli.pick_device; under torchrun on GPUs each process takes its own GPU."""
    device, why = pick_device(requested)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device, why


def setup_distributed(model, use_fsdp):
    """Processes(rank, world, model to call): plain, DDP over the routers, or FSDP2-sharded."""
    if not under_torchrun() or (int(os.environ["WORLD_SIZE"]) == 1 and not use_fsdp):
        return Processes(0, 1, model)
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if next(model.parameters()).is_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return Processes(rank, world, model)
    from torch.nn.parallel import DistributedDataParallel
    return Processes(rank, world, DistributedDataParallel(model))


def sum_over_processes(t):
    """The sum of `t` over all processes (no gradient flows through it): the switch balance loss's
    expert counts, so that every process weighs its share of the batch by the global load."""
    torch.distributed.all_reduce(t)
    return t


# ----------------------------------------------------------------------------------------------
# One ReMoE run, and a sweep of them

def run_remoe(args):
    """Fine-tune the routers of args.model_dir and export the tuned checkpoint to OUT/remoe."""
    started = time.perf_counter()
    cfg = read_config(args.model_dir)  # a missing or malformed model folder stops here, before any work
    if args.seq_len > cfg.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len} is longer than {args.model_dir}'s context "
                        f"(max_position_embeddings {cfg.max_position_embeddings}); expected at most that")
    data_cfg = DataConfig(data=args.data, glob=args.glob, vocab_size=args.vocab_size)
    corpus, _, data = prepare_data(data_cfg, args.data_dir, args.model_dir)  # bad data stops before a long load
    require_windows(data, ("train", args.calib_split, "test"), args.seq_len)
    device, why_device = process_device(args.device)
    dtype, why_dtype = pick_dtype(device, stored_dtype(args.model_dir))
    model = load_model(args.model_dir, device=device, dtype=dtype)
    model.gradient_checkpointing = device.type != "cpu"  # GPU memory is the limit there; on CPU, time is
    gates = router_parameters(model)  # freeze before wrapping: DDP and FSDP register what is trainable then
    base_id = base_identity(args.model_dir, gates)  # before FSDP shards the routers
    procs = setup_distributed(model, args.fsdp)
    compute = f"{device.type}, {str(dtype).removeprefix('torch.')}"
    if procs.rank == 0:
        print(f"compute: {compute} ({why_device}; {why_dtype}); {procs.world} process(es)")
    out_dir = Path(args.out) / "remoe"
    key = remoe_key(args, base_id, corpus, compute, procs.world)
    reports, state_file, earlier = finetune(args, model, data, out_dir, procs=procs, key=key, started=started)
    routers = {l: full_tensor(model.model.layers[l].mlp.gate.weight.detach()) for l in model.config.moe_layers}
    results = None
    if procs.rank == 0:
        results = {"base_model": str(args.model_dir), "stages": reports,
                   "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "summary": summary(reports),
                   # every process that worked on this run, up to the state the next one resumed
                   "wall_seconds": round(earlier + time.perf_counter() - started, 1)}
        export_tuned(args.model_dir, out_dir, model.config, routers, results)
        print(f"\nwrote {out_dir} (only the router tensors differ from {args.model_dir})")
        print_summary(results["summary"])
    if procs.world > 1:
        torch.distributed.barrier()  # the export is complete before any process drops its state
    state_file.unlink(missing_ok=True)
    return results


def summary(reports):
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


def sweep_dir(out, anchor, lam, reuse_set="window"):
    """Where --sweep puts the run of one reuse weight (bench.py finds them there for its Pareto front)."""
    return Path(out) / "sweep" / f"{anchor}{'-cache' if reuse_set == 'cache' else ''}-lambda{lam:g}"


def sweep(args):
    """--sweep: fine-tune once per reuse weight and print reuse vs quality side by side."""
    rows = []
    for lam in args.sweep:
        out = sweep_dir(args.out, args.anchor, lam, args.reuse_set)
        sub = argparse.Namespace(**{**vars(args), "reuse_weight": lam, "out": str(out)})
        rows.append((lam, run_remoe(sub)))
    if rows[0][1] is None:  # not the first process
        return
    print("\nlambda  reuse w=1  change   perplexity  change   load max/mean  LRU hit")
    for lam, results in rows:
        s = results["summary"]
        print(f"{lam:6g}  {s['reuse_tuned']:9.3f}  {s['reuse_change']:+6.1%}  {s['perplexity_tuned']:10.2f}  "
              f"{s['perplexity_change']:+6.2%}  {s['load_max_over_mean_tuned']:13.2f}  {s['lru_hit_tuned']:7.3f}")


# ----------------------------------------------------------------------------------------------
# Command line: the ReMoE flags here, the data, base-model and run flags shared with base.py

def parse_args(argv=None):
    p = ArgumentParser(description="ReMoE: fine-tune the routers of a MoE so that consecutive tokens reuse "
                                            "experts. With no --model, uses the default base model (base.py), "
                                            "built first when it is missing.")
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default=None, help="checkpoint folder to fine-tune (default: the default base model "
                                                 "OUT/base, built on first run)")
    g.add_argument("--out", default=None, help=f"output root: remoe/, base/ and data/ go here (default: {DEFAULT_RUN}, "
                                               "or runs/<model folder name> with --model)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g = p.add_argument_group("ReMoE fine-tuning")
    g.add_argument("--reuse-weight", "--lambda", dest="reuse_weight", type=float, default=0.1,
                   help="lambda: weight of the reuse loss (default: %(default)s)")
    g.add_argument("--window", type=int, default=1,
                   help="w: experts of the previous w tokens count as recent (default: %(default)s)")
    g.add_argument("--reuse-set", choices=("window", "cache"), default="window",
                   help="R_t, the experts the reuse loss rewards: those of the last --window tokens (the paper), or "
                        "those an LRU cache of --reuse-cache experts per layer holds before the token, simulated on "
                        "the routing during training (default: %(default)s)")
    g.add_argument("--reuse-cache", type=int, default=0,
                   help="with --reuse-set cache: the cache size per MoE layer (default: 2 x top-k)")
    g.add_argument("--balance-weight", type=float, default=0.3, help="beta: weight of the load-balance loss "
                                                                     "(default: %(default)s)")
    g.add_argument("--balance", choices=("switch", "sequence"), default="switch",
                   help="balance loss: switch-style over the batch, or DeepSeek's sequence-wise, which fights reuse "
                        "inside a sequence (default: %(default)s)")
    g.add_argument("--balance-boost", type=float, default=4.0, help="beta multiplier in stage 2, balance "
                                                                    "(default: %(default)s)")
    g.add_argument("--anchor", choices=("distill", "router-kl"), default="distill",
                   help="what holds the tuned model near the base: the KL to the base model's next-token distribution "
                        "(distill), or the KL to the base routers' distributions beyond --kl-margin (router-kl, the "
                        "paper's Trust-KL) (default: %(default)s)")
    g.add_argument("--anchor-weight", type=float, default=1.0, help="gamma: weight of the anchor, 0 disables "
                                                                    "(default: %(default)s)")
    g.add_argument("--kl-margin", type=float, default=0.1,
                   help="router-kl: KL (nats, per token and layer) the routers may move for free (default: %(default)s)")
    g.add_argument("--lr", type=float, default=2e-3, help="router learning rate, AdamW (default: %(default)s)")
    g.add_argument("--stage-steps", default="60,15,25",
                   help="steps of stages 1 (reuse-aware), 2 (balance), 3 (calibration) (default: %(default)s)")
    g.add_argument("--calib-split", choices=("train", "val"), default="val",
                   help="split the calibration stage trains on (default: %(default)s)")
    g.add_argument("--sweep", default=None,
                   help="comma-separated reuse weights: fine-tune once per weight into OUT/sweep/ANCHOR-lambdaX and "
                        "print a table (default: one run)")
    g.add_argument("--fsdp", action="store_true", help="shard the frozen model with FSDP2 (under torchrun)")
    base.add_flags(p)
    args = p.parse_args(argv)
    args.default_model = args.model is None
    args.out = args.out or (str(DEFAULT_RUN) if args.model is None else f"runs/{Path(args.model).resolve().name}")
    args.model_dir = Path(args.model) if args.model else Path(args.out) / "base"
    args.data_dir = Path(args.data_dir or Path(args.out) / "data")
    return args


def numbers(text, kind, flag):
    """A comma-separated flag value as a list of non-negative `kind`, or one UserError naming the flag."""
    try:
        values = [kind(x) for x in text.split(",")]
    except ValueError:
        values = [-1]
    if min(values) < 0:
        raise UserError(f"{flag} takes comma-separated numbers >= 0, got {text!r}")
    return values


def prepare_flags(args):
    """base.prepare_flags, then the ReMoE flags: checked before any work, one UserError for a bad one."""
    base.prepare_flags(args)
    args.stage_steps = numbers(args.stage_steps, int, "--stage-steps")
    if len(args.stage_steps) != 3:
        raise UserError(f"--stage-steps takes 3 comma-separated numbers (stages 1, 2, 3), got {len(args.stage_steps)}")
    if args.sweep is not None:
        args.sweep = numbers(args.sweep, float, "--sweep")
    for flag, value in (("--reuse-weight", args.reuse_weight), ("--balance-weight", args.balance_weight),
                        ("--balance-boost", args.balance_boost), ("--anchor-weight", args.anchor_weight),
                        ("--kl-margin", args.kl_margin)):
        if not value >= 0:
            raise UserError(f"{flag} must be >= 0, got {value}")
    if args.window < 1:
        raise UserError(f"--window must be >= 1, got {args.window}")
    if args.reuse_cache < 0:
        raise UserError(f"--reuse-cache must be >= 1 (0: 2 x top-k), got {args.reuse_cache}")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.rebuild_base and not args.default_model:
        raise UserError("--rebuild-base pretrains the default base model, which --model replaces; drop one of them")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world})")
    if args.fsdp and not under_torchrun():
        raise UserError("--fsdp shards the model across the processes that torchrun starts; run "
                        "torchrun --nproc_per_node N train.py --fsdp ..., or drop --fsdp")
    if args.default_model and under_torchrun() and (args.rebuild_base or not (args.model_dir / "config.json").is_file()):
        raise UserError(f"build the default base model in one process before torchrun: python base.py --out {args.out}"
                        f"{' --rebuild-base' if args.rebuild_base else ''}")


def main(argv=None):
    args = parse_args(argv)
    with user_errors(), base.stop_on_interrupt():
        prepare_flags(args)
        if args.default_model and not under_torchrun():
            base.ensure_base(args)
        if args.sweep:
            sweep(args)
        else:
            run_remoe(args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
