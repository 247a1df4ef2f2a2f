"""
train.py: ReMoE, router-only fine-tuning that teaches a fine-grained MoE to reuse the experts that the
last few tokens used, so that a device holding only a few experts per layer loads far fewer of them
from storage. Read `train_step` first: loss = lm + lambda * reuse + beta * balance + gamma * anchor.
Three stages: (1) reuse-aware; (2) balance, beta x 4 while reuse is still rewarded; (3) calibration
on held-out text with lambda annealed to 0. The tuned model is the base checkpoint with only its
router tensors replaced: same architecture, same cost, loads wherever the base loads.
Leaves out: training anything but the routers, DeepSeek-V3's bias-update balancing rule, pipeline and
tensor parallelism. Resuming lives in resume.py, data parallel (DDP, FSDP2) in distributed.py.

    python train.py                                     # the default base model (built first if missing), CPU
    python train.py --model DIR --data PATH             # your own checkpoint and text
    torchrun --nproc_per_node 2 train.py --model DIR    # data parallel; add --fsdp to shard the frozen model
"""

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cache
import router
from checkpoint import export_tuned, load_model, read_config, stored_dtype
from cli import (ArgumentParser, DEFAULT_RUN, UserError, check_output, comma_numbers, config_from_flags, fatal_errors,
                 json_object, parse_routing, pick_dtype, run_lock, user_errors)
from data import DataConfig, prepare_data, random_batch, require_windows
from distributed import (check_processes, full_tensor, process_device, setup_distributed, share, shut_down,
                         sum_over_processes, under_torchrun, wait_for_all)
from resume import TrainingState, corpus_identity, model_identity, stop_on_interrupt
from testbed import (DEFAULT_BASE, LOG_EVERY, PretrainConfig, ensure_base, evaluate, print_change, print_summary, print_sweep,
                     router_weights, summary, sweep_dir)


@dataclass
class ReMoEConfig:
    # the loss: lm + lambda * reuse + beta * balance + gamma * anchor
    reuse_weight: float = 0.1      # lambda
    window: int = 1                # w: the experts of the previous w tokens are R_t, the recent set
    reuse_set: str = "window"      # R_t: "window" (the paper), or "cache": what an LRU cache holds before the token
    reuse_cache: int = 0           # that cache's experts per MoE layer (0: 2 x top-k)
    train_routing: str = ""        # "bias:B" or "keep:J:M": train under that cache-aware routing over that cache
    balance_weight: float = 0.3    # beta
    balance: str = "switch"        # "switch" (over the batch) or "sequence" (DeepSeek's, which fights reuse)
    balance_boost: float = 4.0     # beta's multiplier in stage 2
    anchor: str = "distill"        # "distill" (KL to the base model's next-token distribution) or "router-kl"
    anchor_weight: float = 1.0     # gamma; 0: no anchor
    kl_margin: float = 0.1         # router-kl: KL (nats per token and layer) the routers may move for free
    # the stages
    lr: float = 2e-3               # AdamW, routers only
    stage_steps: tuple[int, int, int] = (60, 15, 25)  # reuse-aware, balance, calibration
    calib_split: str = "val"       # the split the calibration stage trains on
    # batches and runs
    batch_size: int = 16           # sequences per step, global across processes
    seq_len: int = PretrainConfig.seq_len             # these four as in pretraining (testbed.py)
    eval_windows: int = PretrainConfig.eval_windows   # fixed test windows of every stage's report
    seed: int = PretrainConfig.seed
    save_every: int = PretrainConfig.save_every       # steps between resumable states (resume.py)
    # compute
    device: str | None = None      # None: cuda if available, else cpu
    fsdp: bool = False             # under torchrun: shard the frozen model with FSDP2 (else DDP)


class Paths(NamedTuple):
    model_dir: Path  # the checkpoint to tune
    out: Path        # the run folder: the tuned model goes to OUT/remoe
    data_dir: Path   # token and tokenizer cache


# ----------------------------------------------------------------------------------------------
# What is trained, and the base model it is held to

def router_parameters(model):
    """Freeze every parameter except the MoE routers' (`gate.weight`); return the routers. DeepSeek-V3's
    e_score_correction_bias is a buffer set by a balancing rule, not by gradients: it stays as it is."""
    model.requires_grad_(False)
    gates = [m.gate for m in model.moes()]
    for g in gates:
        g.weight.requires_grad_(True)
    return gates


@torch.no_grad()
def base_model_pass(model, base_routers, inputs):
    """The base model's (logits, routing) on `inputs`: this network with its original routers put back
    for one forward pass, so that no second model is held in memory; plain routing, the quality to keep."""
    with router_weights(model, base_routers), cache.steered(model, 0, None):
        return model(inputs, return_routing=True)


def anchor_loss(cfg, logits, routing, base):
    """What holds the tuned model near the base model (0 without one). "distill": KL(base next-token
    distribution || tuned) (Hinton et al. 2015), which leaves the routers free to pick other experts
    that predict as well; "router-kl": the paper's Trust-KL, KL(base router || tuned router) per token
    and layer beyond a margin, a trust region around the original routing."""
    if base is None:
        return 0.0
    base_logits, base_routing = base
    if cfg.anchor == "distill":
        return F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(base_logits.float(), -1),
                        log_target=True, reduction="none").sum(-1).mean()
    return router.router_kl_loss(base_routing, routing, cfg.kl_margin)


# ----------------------------------------------------------------------------------------------
# The training step. The balance loss is switch-style over the whole batch (Fedus et al. 2021):
# DeepSeek's per-sequence loss penalises the reuse inside a sequence that ReMoE asks for, while a
# batch-level loss only asks that different sequences spread over all experts.

def train_step(cfg, procs, opt, batch, *, lam, beta, base_routers, reduce=None):
    """One AdamW step of the routers on this process's batch (B, T+1); returns the three loss terms."""
    model = procs.model
    E, K = model.config.n_routed_experts, model.config.num_experts_per_tok
    inputs, targets = batch[:, :-1], batch[:, 1:]                     # (B, T) each
    # the base model's pass first: it swaps router weights in place, which the tuned pass's graph may not see
    base = base_model_pass(model, base_routers, inputs) if cfg.anchor_weight else None
    logits, routing = procs.wrapped(inputs, return_routing=True)      # (B, T, V); a Routing per MoE layer
    lm = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    # R_t: the last `window` tokens' experts (router.py), or what an LRU cache holds (cache.py)
    recent = [cache.cached_before(r.indices, cfg.reuse_cache or 2 * K, E) for r in routing] if cfg.reuse_set == "cache" else None
    reuse = router.reuse_loss(routing, window=cfg.window, recent=recent)
    balance = router.balance_loss(routing, E, kind=cfg.balance, reduce=reduce)
    loss = lm + lam * reuse + beta * balance + cfg.anchor_weight * anchor_loss(cfg, logits, routing, base)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return lm.detach(), reuse.detach(), balance.detach()  # tensors: reading them waits for the device


# ----------------------------------------------------------------------------------------------
# The three stages, evaluated after each, resumable (resume.py)

def stage_plan(cfg):
    """The three stages: (name, steps, split, reuse weight at stage fraction f, balance weight)."""
    s1, s2, s3 = cfg.stage_steps
    lam, beta = cfg.reuse_weight, cfg.balance_weight
    return [
        ("1 reuse-aware", s1, "train", lambda f: lam, beta),
        # the balance term stays in force; here it is tightened while reuse is still rewarded
        ("2 balance", s2, "train", lambda f: lam, beta * cfg.balance_boost),
        # calibration on held-out text: the reuse weight anneals to zero so quality recovers
        ("3 calibration", s3, cfg.calib_split, lambda f: lam * (1 - f), beta),
    ]


def finetune(cfg, procs, data, state):
    """Run the three stages, saving `state` every cfg.save_every steps. Returns {stage: test report}."""
    model = procs.model
    moes = model.moes()
    base_routers = {m.layer: m.gate.weight.detach().clone() for m in moes}
    opt = torch.optim.AdamW([m.gate.weight for m in moes], lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    plan = stage_plan(cfg)
    saved = state.resume({f"layer {m.layer}": m.gate.weight for m in moes}, opt, gen)
    stage_i, step, reports = (saved["stage"], saved["step"], saved["reports"]) if saved else (0, 0, {})
    if saved and procs.rank == 0:
        where = (f"all {len(plan)} stages done, exporting" if stage_i == len(plan)
                 else f"resuming stage {plan[stage_i][0]} at step {step} of {plan[stage_i][1]}")
        print(f"{where} (saved state {state.path})")
    # under torchrun the switch loss counts experts over the whole global batch, as one process does
    reduce = sum_over_processes if procs.world > 1 and cfg.balance == "switch" else None

    def evaluate_stage(name):  # every process evaluates: FSDP's forward needs them all
        reports[name], _ = evaluate(model, data.test, cfg.seq_len, cfg.eval_windows,
                                    cache_sizes=(2 * model.config.num_experts_per_tok,))
        if procs.rank == 0:
            print_change(name, reports[name], reports["0 base"])

    if "0 base" not in reports:
        evaluate_stage("0 base")
    device = next(model.parameters()).device
    for i in range(stage_i, len(plan)):
        name, steps, split, lam_at, beta = plan[i]
        model.train()
        with tqdm(total=steps, initial=step, desc=f"stage {name}", unit="step", dynamic_ncols=True,
                  disable=procs.rank != 0) as bar:
            while step < steps:
                batch = random_batch(getattr(data, split), cfg.batch_size, cfg.seq_len, gen)  # (B, T+1), alike on every rank
                batch = share(batch, procs).to(device)  # (B/world, T+1): this process's rows
                lm, reuse, bal = train_step(cfg, procs, opt, batch, lam=lam_at(step / max(1, steps)), beta=beta,
                                            base_routers=base_routers, reduce=reduce)
                step += 1
                bar.update(1)
                state.watch(lm, reuse, bal)
                if step % LOG_EVERY == 0 or step == steps:
                    state.check(stage=i, step=step)
                    bar.set_postfix(lm=f"{lm.item():.3f}", reuse=f"{reuse.item():.3f}", bal=f"{bal.item():.3f}")
                if step % cfg.save_every == 0 and step < steps:
                    state.save(stage=i, step=step, reports=reports)
        model.eval()
        evaluate_stage(name)
        state.save(stage=i + 1, step=0, reports=reports)
        step = 0
    return reports


# ----------------------------------------------------------------------------------------------
# One ReMoE run, and a sweep of them

def remoe_key(cfg, data_cfg, corpus, *, model, compute, world):
    """Every setting that changes the tuned routers, by flag: a saved state must match all of them."""
    return {"--model": model, "--data": corpus_identity(data_cfg.data, corpus), "--glob": data_cfg.glob,
            "--device": compute, "processes (torchrun)": world, "--fsdp": cfg.fsdp, "--reuse-weight": cfg.reuse_weight,
            "--window": cfg.window, "--balance": cfg.balance, "--reuse-set": cfg.reuse_set, "--reuse-cache": cfg.reuse_cache,
            "--train-routing": cfg.train_routing,
            "--balance-weight": cfg.balance_weight, "--balance-boost": cfg.balance_boost, "--anchor": cfg.anchor,
            "--anchor-weight": cfg.anchor_weight, "--kl-margin": cfg.kl_margin if cfg.anchor == "router-kl" else None,
            "--lr": cfg.lr, "--stage-steps": list(cfg.stage_steps), "--calib-split": cfg.calib_split,
            "--batch-size": cfg.batch_size, "--seq-len": cfg.seq_len, "--eval-windows": cfg.eval_windows, "--seed": cfg.seed}


def run_remoe(cfg, data_cfg, paths, fresh=False):
    """Fine-tune the routers of paths.model_dir and export the tuned checkpoint to OUT/remoe."""
    started = time.perf_counter()
    config = read_config(paths.model_dir)  # a missing or malformed model folder stops here, before any work
    rule = parse_routing(cfg.train_routing, config.num_experts_per_tok) if cfg.train_routing else None
    if cfg.seq_len > config.max_position_embeddings:
        raise UserError(f"--seq-len {cfg.seq_len} is longer than {paths.model_dir}'s context "
                        f"(max_position_embeddings {config.max_position_embeddings}); expected at most that")
    corpus, _, data = prepare_data(data_cfg, paths.data_dir, paths.model_dir)  # bad data stops before a long load
    require_windows(data, ("train", cfg.calib_split, "test"), cfg.seq_len)
    device, why_device = process_device(cfg.device)
    dtype, why_dtype = pick_dtype(device, stored_dtype(paths.model_dir))
    model = load_model(paths.model_dir, device=device, dtype=dtype)
    model.gradient_checkpointing = device.type != "cpu"  # GPU memory is the limit there; on CPU, time is
    gates = router_parameters(model)  # freeze before wrapping: DDP and FSDP register what is trainable then
    model_id = model_identity(paths.model_dir, [g.weight for g in gates])  # before FSDP shards the routers
    procs = setup_distributed(model, cfg.fsdp)
    compute = f"{device.type}, {str(dtype).removeprefix('torch.')}"
    if procs.rank == 0:
        print(f"compute: {compute} ({why_device}; {why_dtype}); {procs.world} process(es)")
    out_dir = paths.out / "remoe"
    suffix = ".train-state.pt" if procs.world == 1 else f".train-state.rank{procs.rank}.pt"  # FSDP: a shard each
    key = remoe_key(cfg, data_cfg, corpus, model=model_id, compute=compute, world=procs.world)
    state = TrainingState(out_dir.with_name(out_dir.name + suffix), key, fresh=fresh, started=started)
    with cache.steered(model, cfg.reuse_cache or 2 * config.num_experts_per_tok, rule):  # the LM loss, anchor, reports
        reports = finetune(cfg, procs, data, state)
    routers = {m.layer: full_tensor(m.gate.weight.detach()) for m in model.moes()}
    results = None
    if procs.rank == 0:
        results = {"base_model": str(paths.model_dir), "stages": reports, "summary": summary(reports),
                   "settings": {**{k: str(v) for k, v in paths._asdict().items()}, **asdict(data_cfg), **asdict(cfg)},
                   "wall_seconds": round(state.seconds(), 1)}  # every process that worked on this run
        export_tuned(paths.model_dir, out_dir, model.config, routers, results)
        print(f"\nwrote {out_dir} (only the router tensors differ from {paths.model_dir})")
        print_summary(results["summary"])
    wait_for_all(procs)  # the export is complete before any process drops its state
    state.remove()
    return results


def sweep(cfg, data_cfg, paths, lambdas, fresh=False):
    """--sweep: fine-tune once per reuse weight and print reuse vs quality side by side."""
    rows = [(lam, run_remoe(replace(cfg, reuse_weight=lam), data_cfg,
                            paths._replace(out=sweep_dir(paths.out, cfg.anchor, lam, cfg.reuse_set, cfg.train_routing)), fresh))
            for lam in lambdas]
    if rows[0][1] is not None:  # the first process
        print_sweep([(lam, results["summary"]) for lam, results in rows])


# ----------------------------------------------------------------------------------------------
# Command line: every flag, its default taken from ReMoEConfig, PretrainConfig (testbed.py) or DataConfig

def parse_args(argv=None):
    r, b, d = ReMoEConfig, PretrainConfig, DataConfig
    p = ArgumentParser(description="ReMoE: fine-tune the routers of a MoE so that consecutive tokens reuse experts. "
                                   "With no --model, tunes the default base model (testbed.py), built first when missing.")
    g = p.add_argument_group("model and output")
    g.add_argument("--model", help="checkpoint folder to fine-tune (default: the default base model OUT/base)")
    g.add_argument("--out", help=f"root of remoe/, base/, data/ (default: {DEFAULT_RUN}; runs/<model name> with --model)")
    g.add_argument("--device", default=r.device, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--base-only", action="store_true", help="build (or report) the default base model, and stop")
    g = p.add_argument_group("ReMoE fine-tuning")
    g.add_argument("--reuse-weight", "--lambda", dest="reuse_weight", type=float, default=r.reuse_weight,
                   help="lambda: weight of the reuse loss (default: %(default)s)")
    g.add_argument("--window", type=int, default=r.window,
                   help="w: experts of the previous w tokens count as recent (default: %(default)s)")
    g.add_argument("--reuse-set", choices=("window", "cache"), default=r.reuse_set,
                   help="R_t, the experts the reuse loss rewards: those of the last --window tokens (the paper), or those "
                        "an LRU cache of --reuse-cache experts per layer holds before the token (default: %(default)s)")
    g.add_argument("--reuse-cache", type=int, default=r.reuse_cache,
                   help="with --reuse-set cache: the cache size per MoE layer (default: 2 x top-k)")
    g.add_argument("--train-routing", default=r.train_routing, help="train under the device's cache-aware routing over "
                   "an LRU cache of --reuse-cache: bias:B (bonus B on cached experts) or keep:J:M (top-J kept, the rest cached within M)")
    g.add_argument("--balance-weight", type=float, default=r.balance_weight,
                   help="beta: weight of the load-balance loss (default: %(default)s)")
    g.add_argument("--balance", choices=("switch", "sequence"), default=r.balance,
                   help="balance loss: switch-style over the batch, or DeepSeek's sequence-wise, which fights reuse "
                        "inside a sequence (default: %(default)s)")
    g.add_argument("--balance-boost", type=float, default=r.balance_boost, help="beta x this in stage 2 (default: %(default)s)")
    g.add_argument("--anchor", choices=("distill", "router-kl"), default=r.anchor,
                   help="what holds the tuned model near the base: the KL to its next-token distribution (distill), or "
                        "to its routers' beyond --kl-margin (router-kl, the paper's Trust-KL) (default: %(default)s)")
    g.add_argument("--anchor-weight", type=float, default=r.anchor_weight, help="gamma, 0: no anchor (default: %(default)s)")
    g.add_argument("--kl-margin", type=float, default=r.kl_margin,
                   help="router-kl: KL (nats, per token and layer) the routers may move for free (default: %(default)s)")
    g.add_argument("--lr", type=float, default=r.lr, help="router learning rate, AdamW (default: %(default)s)")
    g.add_argument("--stage-steps", default=",".join(map(str, r.stage_steps)),
                   help="steps of stages 1 (reuse-aware), 2 (balance), 3 (calibration) (default: %(default)s)")
    g.add_argument("--calib-split", choices=("train", "val"), default=r.calib_split,
                   help="split the calibration stage trains on (default: %(default)s)")
    g.add_argument("--sweep", help="comma-separated reuse weights: fine-tune once per weight into "
                                   "OUT/sweep/ANCHOR-lambdaX and print a table (default: one run)")
    g.add_argument("--fsdp", action="store_true", help="shard the frozen model with FSDP2 (under torchrun)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data,
                   help="text file, folder of text files or .jsonl with a 'text' field (default: the pinned default corpus, sympy's sources)")
    g.add_argument("--glob", default=d.glob, help="which files of a --data folder to read (default: %(default)s)")
    g.add_argument("--data-dir", help="token and tokenizer cache (default: OUT/data)")
    g.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help="vocabulary of the BPE tokenizer trained for the default base model (default: %(default)s)")
    g = p.add_argument_group("default base model (testbed.py)")
    g.add_argument("--pretrain-steps", type=int, default=b.steps, help="pretraining steps (default: %(default)s)")
    g.add_argument("--pretrain-batch-size", type=int, default=b.batch_size,
                   help="sequences per pretraining step (default: %(default)s)")
    g.add_argument("--pretrain-lr", type=float, default=b.lr, help="peak pretraining learning rate (default: %(default)s)")
    g.add_argument("--balance-coef", type=float, default=b.balance_coef,
                   help="weight of the switch balance loss in pretraining (default: %(default)s)")
    g.add_argument("--base-overrides", help="JSON object overriding keys of DEFAULT_BASE, e.g. "
                                            "'{\"hidden_size\": 96}' (default: none)")
    g.add_argument("--rebuild-base", action="store_true", help="pretrain the base model again even if OUT/base exists")
    g = p.add_argument_group("batches and runs")
    g.add_argument("--batch-size", type=int, default=r.batch_size,
                   help="sequences per ReMoE step, global across processes (default: %(default)s)")
    g.add_argument("--seq-len", type=int, default=r.seq_len, help="tokens per sequence (default: %(default)s)")
    g.add_argument("--eval-windows", type=int, default=r.eval_windows, help="fixed test windows (default: %(default)s)")
    g.add_argument("--save-every", type=int, default=r.save_every, help="steps between saved states (default: %(default)s)")
    g.add_argument("--seed", type=int, default=r.seed, help="random seed (default: %(default)s)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--no-resume", action="store_true", help="start over instead of resuming a saved training state")
    args = p.parse_args(argv)
    args.out = args.out or (str(DEFAULT_RUN) if args.model is None else f"runs/{Path(args.model).resolve().name}")
    args.paths = Paths(Path(args.model) if args.model else Path(args.out) / "base", Path(args.out),
                       Path(args.data_dir or Path(args.out) / "data"))
    return args


def prepare_flags(args):
    """Check every flag before any work (one UserError naming the flag and what was expected), apply
    --threads; return the configs (ReMoEConfig, PretrainConfig, DataConfig)."""
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--pretrain-batch-size", args.pretrain_batch_size, 1),
                               ("--seq-len", args.seq_len, 1), ("--eval-windows", args.eval_windows, 1),
                               ("--save-every", args.save_every, 1), ("--pretrain-steps", args.pretrain_steps, 1),
                               ("--vocab-size", args.vocab_size, 257), ("--threads", args.threads or 1, 1),
                               ("--window", args.window, 1), ("--reuse-cache", args.reuse_cache, 0)):
        if value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    for flag, value in (("--pretrain-lr", args.pretrain_lr), ("--lr", args.lr)):
        if not value > 0:
            raise UserError(f"{flag} must be > 0, got {value}")
    for flag, value in (("--balance-coef", args.balance_coef), ("--reuse-weight", args.reuse_weight),
                        ("--balance-weight", args.balance_weight), ("--balance-boost", args.balance_boost),
                        ("--anchor-weight", args.anchor_weight), ("--kl-margin", args.kl_margin)):
        if not value >= 0:
            raise UserError(f"{flag} must be >= 0, got {value}")
    stage_steps = comma_numbers(args.stage_steps, int, "--stage-steps")
    if len(stage_steps) != 3:
        raise UserError(f"--stage-steps takes 3 comma-separated numbers (stages 1, 2, 3), got {len(stage_steps)}")
    if args.sweep is not None:
        args.sweep = comma_numbers(args.sweep, float, "--sweep")
    overrides = json_object(args.base_overrides, "--base-overrides", DEFAULT_BASE, "DEFAULT_BASE (testbed.py)",
                            example='{"hidden_size": 96}')
    built = args.model is None and (args.rebuild_base or not (args.paths.model_dir / "config.json").is_file())
    if args.train_routing:  # before a base model is pretrained, against the top-k the fine-tuned model will have
        parse_routing(args.train_routing, (DEFAULT_BASE | overrides)["num_experts_per_tok"] if built
                      else read_config(args.paths.model_dir).num_experts_per_tok)
    for flag, given, does in (("--rebuild-base", args.rebuild_base, "pretrains"), ("--base-only", args.base_only, "builds")):
        if given and args.model is not None:
            raise UserError(f"{flag} {does} the default base model, which --model replaces; drop one of them")
    check_processes(args.batch_size, args.fsdp)
    if under_torchrun() and (built or args.model is None and args.base_only):
        raise UserError(f"build the default base model in one process before torchrun: python train.py --base-only "
                        f"--out {args.out}{' --rebuild-base' if args.rebuild_base else ''}")
    check_output(args.paths.out, "--out", [args.paths.model_dir] if args.model else [], folder=True)  # not into --model
    if args.threads:
        torch.set_num_threads(args.threads)
    remoe = config_from_flags(ReMoEConfig, args, stage_steps=tuple(stage_steps))
    pretrain = config_from_flags(PretrainConfig, args, steps=args.pretrain_steps, batch_size=args.pretrain_batch_size,
                                 lr=args.pretrain_lr, overrides=overrides)
    return remoe, pretrain, config_from_flags(DataConfig, args)


def main(argv=None):
    args = parse_args(argv)
    with user_errors(), fatal_errors(), stop_on_interrupt():
        remoe, pretrain, data = prepare_flags(args)
        with run_lock(args.out):
            if args.model is None and not under_torchrun():
                ensure_base(pretrain, data, args.paths.model_dir, args.paths.data_dir, rebuild=args.rebuild_base,
                            fresh=args.no_resume)
            if args.sweep and not args.base_only:
                sweep(remoe, data, args.paths, args.sweep, fresh=args.no_resume)
            elif not args.base_only:
                run_remoe(remoe, data, args.paths, fresh=args.no_resume)
    shut_down()


if __name__ == "__main__":
    main()
