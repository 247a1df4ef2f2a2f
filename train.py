"""
train.py: ReMoE router-only fine-tuning, and building the small default base model it starts from.

What it teaches: ReMoE fine-tunes the router of an already trained MoE, so the default run needs
a trained base model whose routing looks like a real one's. With no model hub here, remoe builds
one on first run: a DeepSeek-V2-style fine-grained MoE (MLA attention, one dense layer first, then
MoE layers of many small routed experts plus a shared expert), pretrained on the Python standard
library's sources with next-token loss plus the standard switch-style load-balance loss (Fedus et
al. 2021), so that its experts are used about evenly, as a real model's are. An unbalanced router
would make expert reuse trivially high and the whole study meaningless.

The base model is saved in the exact Hugging Face layout (config.json with model_type
deepseek_v2, model.safetensors, tokenizer.json), so transformers loads it unchanged.

    python train.py                          # build (or reuse) runs/default/base, report it
    python train.py --pretrain-steps 50      # a quick, worse base model (for a look)
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import router
from data import DataConfig, DataError, eval_windows, prepare_data, random_batch
from model import UserError, build_model, disk_name, load_model

# ----------------------------------------------------------------------------------------------
# The default base model: small enough to pretrain on 2 CPU cores in about 4 minutes, shaped like
# DeepSeek-V2-Lite where it matters for caching: many small routed experts (32) and a top-k (4)
# eight times smaller, so a cache of 2 x top-k = 8 experts per layer holds a quarter of them
# (V2-Lite: 64 experts, top-6, a cache of 12 holds 19%).

DEFAULT_BASE = {
    "model_type": "deepseek_v2",
    "architectures": ["DeepseekV2ForCausalLM"],
    "hidden_size": 192,
    "num_hidden_layers": 5,            # layer 0 dense, layers 1-4 MoE
    "first_k_dense_replace": 1,
    "intermediate_size": 512,          # the dense layer's MLP
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
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "rope_theta": 10000.0,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def base_config(vocab_size, eot_id, **overrides):
    return {**DEFAULT_BASE, **overrides, "vocab_size": vocab_size, "bos_token_id": eot_id, "eos_token_id": eot_id}


def init_weights(model, std=0.02):
    """GPT-2 style init: N(0, 0.02), norms at 1, residual output projections scaled by 1/sqrt(2L)."""
    L = model.config.num_hidden_layers
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, 0.0, std / math.sqrt(2 * L))
        else:
            torch.nn.init.normal_(p, 0.0, std)


# ----------------------------------------------------------------------------------------------
# Evaluation: loss, perplexity and routing on fixed windows (the same windows every run)

@torch.no_grad()
def evaluate(model, tokens, seq_len=256, max_windows=64, batch_size=8, cache_sizes=()):
    """Mean next-token loss over fixed test windows, and the routing report of router.py on them."""
    windows = eval_windows(tokens, seq_len, max_windows)  # (W, T+1)
    total, count, routing_all = 0.0, 0, []
    for chunk in windows.split(batch_size):
        logits, routing = model(chunk[:, :-1], return_routing=True)
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
        routing_all.append(routing)
    # stack every batch's routing per layer, so reuse and load are measured over all windows
    routing = [r._replace(indices=torch.cat([b[i].indices for b in routing_all]),
                          weights=torch.cat([b[i].weights for b in routing_all]),
                          scores=torch.cat([b[i].scores for b in routing_all]))
               for i, r in enumerate(routing_all[0])]
    loss = total / count
    report = router.routing_report(routing, model.config.n_routed_experts, windows=(1, 2, 4), cache_sizes=cache_sizes)
    metrics = {"loss": loss, "perplexity": math.exp(loss), "tokens": count, **report}
    return json.loads(json.dumps(metrics)), routing  # JSON-shaped (string keys), as results.json holds it


def unigram_loss(train, test, vocab_size):
    """Cross-entropy of the test split under token frequencies of the train split (add-one smoothed):
    the loss of a model that ignores context, the baseline a language model must beat."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(test)].mean())


# ----------------------------------------------------------------------------------------------
# Saving in the Hugging Face layout, atomically (a temp folder renamed into place)

def new_temp_dir(out_dir):
    """An empty folder beside out_dir, to be renamed onto it by replace_dir once complete."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is meant to be shared
    return tmp


def replace_dir(tmp, out_dir):
    """Rename tmp onto out_dir; an existing out_dir is moved aside first and removed after."""
    for f in tmp.iterdir():
        if f.stat().st_nlink == 1:  # leave hard-linked files of the base model alone
            f.chmod(0o644)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


def save_hf_checkpoint(model, config_dict, out_dir, tokenizer_file=None, extra_files=None):
    """config.json + model.safetensors (+ tokenizer.json) written to a temp folder, then renamed onto
    out_dir, so a crash leaves either the old checkpoint or the new one, never half of one."""
    out_dir = Path(out_dir)
    tmp = new_temp_dir(out_dir)
    cfg = model.config
    state = {disk_name(cfg, k): v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config_dict, indent=2))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
    for name, obj in (extra_files or {}).items():
        (tmp / name).write_text(json.dumps(obj, indent=2))
    replace_dir(tmp, out_dir)


def save_state_atomic(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Pretraining the base model

def pretrain(args, data, out_dir):
    """Next-token loss + switch balance loss, AdamW with warm-up and cosine decay. Resumable: the
    training state is saved atomically every --save-every steps beside the output folder."""
    torch.manual_seed(args.seed)
    config_dict = base_config(data.vocab_size, data.eot_id, **json.loads(args.base_overrides or "{}"))
    model = build_model(config_dict)
    init_weights(model)
    E = model.config.n_routed_experts
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    state_file = out_dir.with_name(out_dir.name + ".pretrain-state.pt")
    step, gen = 0, torch.Generator().manual_seed(args.seed)
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        if state["config"] == config_dict and state["steps"] == args.pretrain_steps:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            step = state["step"]
            gen.set_state(state["gen"])
            print(f"resuming pretraining at step {step} from {state_file}")

    def lr_at(s):  # linear warm-up, then cosine decay to 10%
        warm = max(1, args.pretrain_steps // 20)
        if s < warm:
            return args.pretrain_lr * (s + 1) / warm
        frac = (s - warm) / max(1, args.pretrain_steps - warm)
        return args.pretrain_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    tokens_per_step = args.batch_size * args.seq_len
    t0 = time.perf_counter()
    with tqdm(total=args.pretrain_steps, initial=step, desc="pretrain base", unit="step", dynamic_ncols=True) as bar:
        while step < args.pretrain_steps:
            batch = random_batch(data.train, args.batch_size, args.seq_len, gen)  # (B, T+1)
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
            rate = (step - bar.initial) * tokens_per_step / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{lm.item():.3f}", balance=f"{bal.item():.3f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
            if step % args.save_every == 0 and step < args.pretrain_steps:
                save_state_atomic({"config": config_dict, "steps": args.pretrain_steps, "step": step,
                                   "model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state()},
                                  state_file)
    model.eval()
    wall = time.perf_counter() - t0
    return model, config_dict, wall, state_file


def build_default_base(args, out_dir):
    """Pretrain the default base model on the stdlib corpus, save it, report its quality and routing."""
    t_start = time.perf_counter()
    corpus, tok, data = prepare_data(DataConfig(data=args.data, vocab_size=args.vocab_size), args.data_dir)
    print(f"corpus: {len(corpus.train)} train / {len(corpus.val)} val / {len(corpus.test)} test documents, "
          f"{len(data.train):,} / {len(data.val):,} / {len(data.test):,} tokens, vocab {data.vocab_size}")
    model, config_dict, wall, state_file = pretrain(args, data, out_dir)
    cache = 2 * model.config.num_experts_per_tok
    metrics, _ = evaluate(model, data.test, args.seq_len, args.eval_windows, cache_sizes=(cache,))
    uni = unigram_loss(data.train, data.test, data.vocab_size)
    results = {
        "config": {k: v for k, v in config_dict.items() if k != "architectures"},
        "pretrain": {"steps": args.pretrain_steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "tokens": args.pretrain_steps * args.batch_size * args.seq_len, "lr": args.pretrain_lr,
                     "balance_coef": args.balance_coef, "wall_seconds": round(wall, 1),
                     "total_seconds": round(time.perf_counter() - t_start, 1), "threads": torch.get_num_threads()},
        "test": {**metrics, "unigram_loss": uni, "unigram_perplexity": math.exp(uni)},
    }
    save_hf_checkpoint(model, config_dict, out_dir, Path(args.data_dir) / "tokenizer.json",
                       extra_files={"results.json": results})
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
    print(f"reuse rate (w=1) {t['reuse']['1']:.3f}, LRU hit rate at cache {list(t['lru_hit_rate'])[0]}: "
          f"{list(t['lru_hit_rate'].values())[0]:.3f}")


# ----------------------------------------------------------------------------------------------
# ReMoE: router-only fine-tuning in three stages
#
# loss = next-token loss + lambda * reuse loss (router.py) + beta * balance loss
#        + gamma * KL(base model's next-token distribution || tuned model's)
#
# The balance loss is switch-style over the whole batch by default: reuse asks consecutive tokens of
# one sequence to share experts, which a per-sequence balance loss directly penalises, while a
# batch-level loss only asks that different sequences spread over all experts. (Under torchrun each
# process computes it on its share of the batch; the sequence-wise loss splits exactly.)
#
# The anchor is a distillation to the frozen base model's *output*, not a KL to the base router's
# distribution: reuse can only rise if routing changes, and a router-KL anchor penalises exactly
# that change, whatever it does to quality. Distillation constrains what users care about, the
# predictions, and leaves the router free to pick different experts that predict as well. It costs
# no extra memory: the base model is this model with the original router weights, which we copy
# in for one no-grad forward per step (routers are a tiny fraction of the parameters).

def router_parameters(model):
    """Freeze every parameter except the MoE routers' (`gate.weight`); return the routers.
    DeepSeek-V3's e_score_correction_bias is a buffer set by a balancing rule, not by gradients
    (it only shifts which experts are chosen, so no gradient reaches it): it stays as it is."""
    for p in model.parameters():
        p.requires_grad_(False)
    gates = [model.model.layers[l].mlp.gate for l in model.config.moe_layers]
    for g in gates:
        g.weight.requires_grad_(True)
    return gates


@torch.no_grad()
def teacher_logits(model, gates, base_weights, inputs):
    """The base model's logits: the same network with the original router weights copied in."""
    tuned = [g.weight.detach().clone() for g in gates]
    for g, w in zip(gates, base_weights):
        g.weight.copy_(w)
    logits = model(inputs)
    for g, w in zip(gates, tuned):
        g.weight.copy_(w)
    return logits


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


def finetune(args, model, data, out_dir, dist_info):
    """Run the three stages; evaluate after each; resumable from an atomic state file."""
    rank, world, ddp_model = dist_info
    gates = router_parameters(model)
    base_weights = [g.weight.detach().clone() for g in gates]
    opt = torch.optim.AdamW([g.weight for g in gates], lr=args.lr, weight_decay=0.0)
    E, cache = model.config.n_routed_experts, 2 * model.config.num_experts_per_tok
    # one state file per process: under FSDP each holds its own shard of the routers and optimizer
    state_file = out_dir.with_name(out_dir.name + (".train-state.pt" if world == 1 else f".train-state.rank{rank}.pt"))
    gen = torch.Generator().manual_seed(args.seed)
    stage_i, step, reports = 0, 0, {}

    def save_state(stage, step):
        save_state_atomic({"run_key": run_key, "stage": stage, "step": step, "reports": reports,
                           "routers": [g.weight.detach().clone() for g in gates],
                           "opt": opt.state_dict(), "gen": gen.get_state()}, state_file)

    def evaluate_stage(name):  # every process evaluates: FSDP's forward needs them all
        reports[name] = evaluate(model, data.test, args.seq_len, args.eval_windows, cache_sizes=(cache,))[0]
        if rank == 0:
            print_stage(name, reports[name], reports["0 base"])

    run_key = {"model": str(args.model_dir), "stage_steps": list(args.stage_steps), "world": world,
               "reuse_weight": args.reuse_weight, "balance_weight": args.balance_weight, "lr": args.lr}
    if state_file.exists() and not args.no_resume:
        state = torch.load(state_file, weights_only=False)
        if state["run_key"] == run_key:
            with torch.no_grad():
                for g, w in zip(gates, state["routers"]):
                    g.weight.copy_(w)
            opt.load_state_dict(state["opt"])
            stage_i, step, reports = state["stage"], state["step"], state["reports"]
            gen.set_state(state["gen"])
            if rank == 0:
                print(f"resuming at stage {stage_i + 1}, step {step} from {state_file}")
    if "0 base" not in reports:
        evaluate_stage("0 base")
    per_rank = args.batch_size // world
    plan = stage_plan(args)
    for i in range(stage_i, len(plan)):
        name, steps, split, lam_at, beta = plan[i]
        tokens = getattr(data, split)
        model.train()
        with tqdm(total=steps, initial=step, desc=f"stage {name}", unit="step", dynamic_ncols=True,
                  disable=rank != 0) as bar:
            while step < steps:
                batch = random_batch(tokens, args.batch_size, args.seq_len, gen)  # (B, T+1), the same on every rank
                batch = batch[rank * per_rank:(rank + 1) * per_rank]  # this rank's share of the global batch
                inputs, targets = batch[:, :-1], batch[:, 1:]
                lam = lam_at(step / max(1, steps))
                teacher = teacher_logits(model, gates, base_weights, inputs) if args.distill_weight else None
                logits, routing = ddp_model(inputs, return_routing=True)
                lm = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                reuse = router.reuse_loss(routing, window=args.window)
                bal = router.balance_loss(routing, E, kind=args.balance)
                loss = lm + lam * reuse + beta * bal
                if teacher is not None:
                    kl = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(teacher.float(), -1),
                                  log_target=True, reduction="none").sum(-1).mean()
                    loss = loss + args.distill_weight * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.set_postfix(lm=f"{lm.item():.3f}", reuse=f"{reuse.item():.3f}", bal=f"{bal.item():.3f}")
                bar.update(1)
                if step % args.save_every == 0 and step < steps:
                    save_state(i, step)
        model.eval()
        evaluate_stage(name)
        save_state(i + 1, 0)
        step = 0
    return reports, state_file


def print_stage(name, r, base):
    cache, hit = next(iter(r["lru_hit_rate"].items()))
    rel = r["reuse"]["1"] / base["reuse"]["1"] - 1
    print(f"[{name}] test ppl {r['perplexity']:.2f} ({r['perplexity'] / base['perplexity'] - 1:+.2%}), "
          f"reuse w=1 {r['reuse']['1']:.3f} ({rel:+.1%}), load max/mean {max(r['load_max_over_mean']):.2f}, "
          f"LRU hit @{cache} {hit:.3f}")


# ----------------------------------------------------------------------------------------------
# Exporting the tuned model: the base checkpoint with only the router tensors replaced

def full_tensor(t):
    """The whole tensor, also from an FSDP2-sharded parameter (a DTensor; gathering is collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def export_tuned(base_dir, out_dir, cfg, routers, results):
    """Write out_dir atomically: every file of base_dir hard-linked (or copied), except the
    safetensors files that hold router tensors, which are rewritten with the tuned routers in the
    checkpoint's own dtype. Names, shapes, shards and the index stay exactly as they were."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    routers = {disk_name(cfg, f"model.layers.{l}.mlp.gate.weight"): w for l, w in routers.items()}
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = {name: "model.safetensors" for name in routers}
    to_rewrite = {weight_map[name] for name in routers}
    tmp = new_temp_dir(out_dir)
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
        else:
            try:
                os.link(f, tmp / f.name)  # same bytes, no copy: the tuned model costs only its routers
            except OSError:
                shutil.copyfile(f, tmp / f.name)
    (tmp / "results.json").write_text(json.dumps(results, indent=2))
    replace_dir(tmp, out_dir)


# ----------------------------------------------------------------------------------------------
# Distributed data parallel (torchrun) and FSDP2

def setup_distributed(model, use_fsdp):
    """(rank, world, model to call): plain, DDP over the routers, or FSDP2-sharded."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not use_fsdp:
        return 0, 1, model
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return rank, world, model
    from torch.nn.parallel import DistributedDataParallel
    return rank, world, DistributedDataParallel(model)


def run_remoe(args):
    """Fine-tune the routers of args.model_dir and export the tuned checkpoint to OUT/remoe."""
    t0 = time.perf_counter()
    device, dtype, why = pick_device(args)
    model = load_model(args.model_dir, device=device, dtype=dtype)
    model.gradient_checkpointing = device != "cpu"  # GPU memory is the limit there; on CPU, time is
    router_parameters(model)  # freeze before wrapping: DDP and FSDP register what is trainable then
    rank, world, ddp_model = setup_distributed(model, args.fsdp)
    if rank == 0:
        print(f"compute: {device}, {str(dtype).replace('torch.', '')} ({why}); {world} process(es)")
    if args.batch_size % world:
        raise DataError(f"--batch-size {args.batch_size} must be divisible by the number of processes {world}")
    _, _, data = prepare_data(DataConfig(data=args.data, vocab_size=args.vocab_size), args.data_dir, args.model_dir)
    out_dir = Path(args.out) / "remoe"
    reports, state_file = finetune(args, model, data, out_dir, (rank, world, ddp_model))
    routers = {l: full_tensor(model.model.layers[l].mlp.gate.weight.detach()) for l in model.config.moe_layers}
    if rank == 0:
        results = {"base_model": str(args.model_dir), "stages": reports,
                   "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "summary": summary(reports), "wall_seconds": round(time.perf_counter() - t0, 1)}
        export_tuned(args.model_dir, out_dir, model.config, routers, results)
        print(f"\nwrote {out_dir} (only the router tensors differ from {args.model_dir})")
        print_summary(results["summary"])
    if world > 1:
        torch.distributed.barrier()  # the export is complete before any process drops its state
    state_file.unlink(missing_ok=True)
    return results if rank == 0 else None


def summary(reports):
    base, final = reports["0 base"], reports[list(reports)[-1]]
    cache = next(iter(base["lru_hit_rate"]))
    return {"perplexity_base": base["perplexity"], "perplexity_tuned": final["perplexity"],
            "perplexity_change": final["perplexity"] / base["perplexity"] - 1,
            "reuse_base": base["reuse"]["1"], "reuse_tuned": final["reuse"]["1"],
            "reuse_change": final["reuse"]["1"] / base["reuse"]["1"] - 1,
            "load_max_over_mean_base": max(base["load_max_over_mean"]),
            "load_max_over_mean_tuned": max(final["load_max_over_mean"]),
            "lru_cache": cache, "lru_hit_base": base["lru_hit_rate"][cache], "lru_hit_tuned": final["lru_hit_rate"][cache]}


def print_summary(s):
    print(f"reuse (w=1) {s['reuse_base']:.3f} -> {s['reuse_tuned']:.3f} ({s['reuse_change']:+.1%}), "
          f"perplexity {s['perplexity_base']:.2f} -> {s['perplexity_tuned']:.2f} ({s['perplexity_change']:+.2%}), "
          f"load max/mean {s['load_max_over_mean_base']:.2f} -> {s['load_max_over_mean_tuned']:.2f}, "
          f"LRU hit @{s['lru_cache']} {s['lru_hit_base']:.3f} -> {s['lru_hit_tuned']:.3f}")


def pick_device(args):
    if args.device == "cpu" or (args.device is None and not torch.cuda.is_available()):
        return "cpu", torch.float32, "CPU: float32, since bfloat16 matmuls are ~100x slower on CPU"
    return args.device or "cuda", torch.bfloat16, "GPU: bfloat16 weights, as the checkpoints ship"


def sweep(args):
    """--sweep: fine-tune once per reuse weight and print reuse vs quality side by side."""
    rows = []
    root = Path(args.out)
    for lam in args.sweep:
        sub = argparse.Namespace(**{**vars(args), "reuse_weight": lam, "out": str(root / f"sweep-lambda{lam:g}")})
        rows.append((lam, run_remoe(sub)["summary"]))
    print("\nlambda  reuse w=1  change   perplexity  change   load max/mean  LRU hit")
    for lam, s in rows:
        print(f"{lam:6g}  {s['reuse_tuned']:9.3f}  {s['reuse_change']:+6.1%}  {s['perplexity_tuned']:10.2f}  "
              f"{s['perplexity_change']:+6.2%}  {s['load_max_over_mean_tuned']:13.2f}  {s['lru_hit_tuned']:7.3f}")


# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ReMoE: fine-tune the routers of a MoE so consecutive tokens reuse experts. "
                                            "With no --model, builds (once) and uses the embedded default base model.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="checkpoint folder to fine-tune (default: the embedded default base "
                                                 "model OUT/base, built on first run)")
    g.add_argument("--data", default=None, help="text file, folder of text files or .jsonl (default: Python stdlib)")
    g.add_argument("--out", default=None, help="output root (default runs/default, or runs/<model folder name>): "
                                               "base/, remoe/ and the data cache go here")
    g.add_argument("--data-dir", default=None, help="token and tokenizer cache (default: OUT/data)")
    g.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary of the default tokenizer")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    g = p.add_argument_group("ReMoE fine-tuning")
    g.add_argument("--reuse-weight", "--lambda", dest="reuse_weight", type=float, default=0.1,
                   help="lambda: weight of the reuse loss")
    g.add_argument("--window", type=int, default=1, help="w: experts of the previous w tokens count as recent")
    g.add_argument("--balance-weight", type=float, default=0.3, help="beta: weight of the load-balance loss")
    g.add_argument("--balance", choices=("switch", "sequence"), default="switch",
                   help="balance loss: switch-style over the batch, or DeepSeek's sequence-wise (which fights reuse "
                        "inside a sequence, but splits exactly across processes)")
    g.add_argument("--balance-boost", type=float, default=4.0, help="beta multiplier in stage 2 (balance)")
    g.add_argument("--distill-weight", type=float, default=1.0,
                   help="gamma: weight of the KL to the base model's next-token distribution (0 disables)")
    g.add_argument("--lr", type=float, default=2e-3, help="router learning rate (AdamW)")
    g.add_argument("--stage-steps", type=lambda s: [int(x) for x in s.split(",")], default=[60, 15, 25],
                   help="steps of stages 1 (reuse-aware), 2 (balance), 3 (calibration), comma-separated")
    g.add_argument("--calib-split", choices=("train", "val"), default="val", help="split used for calibration")
    g.add_argument("--sweep", type=lambda s: [float(x) for x in s.split(",")], default=None,
                   help="comma-separated reuse weights: fine-tune once per weight and print a table")
    g.add_argument("--fsdp", action="store_true", help="shard the frozen model with FSDP2 (under torchrun)")
    g.add_argument("--no-resume", action="store_true", help="ignore a saved training state and start over")
    g = p.add_argument_group("default base model")
    g.add_argument("--pretrain-steps", type=int, default=180, help="pretraining steps of the default base model")
    g.add_argument("--pretrain-lr", type=float, default=3e-3, help="peak learning rate of pretraining")
    g.add_argument("--balance-coef", type=float, default=0.03, help="weight of the switch balance loss in pretraining")
    g.add_argument("--base-overrides", default=None, help="JSON dict overriding the default base config")
    g.add_argument("--rebuild-base", action="store_true", help="pretrain the base model again even if it exists")
    g.add_argument("--base-only", action="store_true", help="build and report the base model, do not fine-tune")
    g = p.add_argument_group("batches and runs")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per step (global, across processes)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    g.add_argument("--eval-windows", type=int, default=64, help="fixed test windows for evaluation")
    g.add_argument("--save-every", type=int, default=50, help="steps between resumable training states")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if len(args.stage_steps) != 3:
        p.error("--stage-steps takes three comma-separated numbers")
    args.default_model = args.model is None
    args.out = args.out or ("runs/default" if args.model is None else f"runs/{Path(args.model).resolve().name}")
    args.model_dir = Path(args.model) if args.model else Path(args.out) / "base"
    args.data_dir = Path(args.data_dir or Path(args.out) / "data")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.default_model:
            if args.rebuild_base or not (args.model_dir / "config.json").is_file():
                build_default_base(args, args.model_dir)
            else:
                print(f"using the default base model in {args.model_dir} (--rebuild-base to pretrain it again)")
                if (args.model_dir / "results.json").is_file():
                    print_base_report(json.loads((args.model_dir / "results.json").read_text()))
            if args.base_only:
                return
        if args.sweep:
            sweep(args)
        else:
            run_remoe(args)
    except (DataError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last saved state", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
