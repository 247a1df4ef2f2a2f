"""train.py and the files it uses: the base model that `train.py --base-only` builds (testbed.py) loads in
transformers with the same logits; ReMoE
trains only the routers, exports a checkpoint in which only router tensors differ, resumes after a
Ctrl-C or a SIGKILL bit for bit but only a state that the same arguments made, leaves no temporary
files behind, and gives the same routers in 2 data-parallel processes as in one with the same global
batch; bad input ends in one `error:` line."""

import ast
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoint
import cli
import resume
import router
import train
from tiny import SMALL_RUN, assert_cli_errors, assert_close, finetune_args, load_oracle, make_checkpoint, read_tensors

REPO = Path(__file__).resolve().parent.parent


def interrupt_call(monkeypatch, module, name, n):
    """Make module.name raise KeyboardInterrupt (a Ctrl-C) on its n-th call; monkeypatch.undo() restores it."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def add_wall_seconds(state_file, seconds):
    """Pretend the processes before the interruption worked `seconds` longer than they did."""
    state = torch.load(state_file, weights_only=True)
    state["wall_seconds"] += seconds
    torch.save(state, state_file)


def hidden_files(folder):
    """What atomic writes leave when they do not clean up: names starting with a dot."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


def routers(folder):
    with safe_open(Path(folder) / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.endswith("mlp.gate.weight")}


def assert_same_routers(a, b):
    ra, rb = routers(a), routers(b)
    assert ra.keys() == rb.keys() and ra
    for k in ra:
        assert torch.equal(ra[k], rb[k]), k


# ----------------------------------------------------------------------------------------------
# testbed.py: the default base model, built by train.py --base-only

def test_base_model_is_a_hugging_face_checkpoint(base_run):
    base_dir = base_run / "base"
    assert {"config.json", "model.safetensors", "tokenizer.json", "results.json"} <= {f.name for f in base_dir.iterdir()}
    cfg = json.loads((base_dir / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2" and cfg["n_routed_experts"] == 8
    hf = load_oracle(base_dir)
    ours = checkpoint.load_model(base_dir)
    ids = torch.randint(0, cfg["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-4, msg="base model logits vs transformers")
    t = json.loads((base_dir / "results.json").read_text())["test"]
    assert t["unigram_loss"] > 0 and len(t["load_max_over_mean"]) == 3 and 0 <= t["reuse"]["1"] <= 1  # all 3 layers MoE
    assert list(t["lru_hit_rate"]) == ["4"] and 0 < t["lru_hit_rate"]["4"] < 1  # cache of 2 x top-k
    assert hidden_files(base_run) == []


def test_second_run_reuses_the_base(base_run, corpus, capsys):
    before = (base_run / "base" / "model.safetensors").stat().st_mtime_ns
    train.main(["--base-only", "--data", str(corpus), "--out", str(base_run), *SMALL_RUN])
    assert "using the default base model" in capsys.readouterr().out
    assert (base_run / "base" / "model.safetensors").stat().st_mtime_ns == before


def test_pretraining_resumes_only_with_the_same_arguments(base_run, corpus, tmp_path, monkeypatch, capsys):
    """Interrupt pretraining mid-way: a rerun with another --seed is refused with both values named; the
    same command resumes from the saved state and ends with the weights of the uninterrupted run, and
    its wall_seconds include the time of the interrupted process."""
    args = ["--base-only", "--data", str(corpus), "--out", str(tmp_path), *SMALL_RUN, "--save-every", "1"]
    state_file = tmp_path / "base.pretrain-state.pt"
    interrupt_call(monkeypatch, router, "balance_loss", 3)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 130 and not (tmp_path / "base").exists() and state_file.exists()
    monkeypatch.undo()
    add_wall_seconds(state_file, 1000.0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--seed", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "--seed: 0 in the state, 1 now" in err and "--no-resume" in err
    train.main(args)
    assert "resuming pretraining at step 2 of 4" in capsys.readouterr().out
    assert not state_file.exists() and hidden_files(tmp_path) == []
    a, b = read_tensors(base_run / "base"), read_tensors(tmp_path / "base")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "base" / "results.json").read_text())["pretrain"]["wall_seconds"] >= 1000


# ----------------------------------------------------------------------------------------------
# train.py: ReMoE

def test_only_router_parameters_get_gradients(base_run):
    model = checkpoint.load_model(base_run / "base")
    gates = train.router_parameters(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    logits, routing = model(ids, return_routing=True)
    (logits.logsumexp(-1).mean() + router.reuse_loss(routing)).backward()
    trained = {id(g.weight) for g in gates}
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert len(gates) == len(model.config.moe_layers)


@pytest.fixture(scope="session")
def tuned_run(base_run, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned")
    shutil.copytree(base_run / "base", out / "base")
    train.main(finetune_args(corpus, out))
    return out


def test_export_changes_only_routers_and_loads_in_transformers(tuned_run):
    base_t, tuned = read_tensors(tuned_run / "base"), read_tensors(tuned_run / "remoe")
    assert base_t.keys() == tuned.keys()
    changed = {k for k in base_t if not torch.equal(base_t[k], tuned[k])}
    assert changed and all(k.endswith("mlp.gate.weight") for k in changed)
    # files without routers are hard links to the base model's
    assert os.path.samefile(tuned_run / "base" / "tokenizer.json", tuned_run / "remoe" / "tokenizer.json")
    hf, ours = load_oracle(tuned_run / "remoe"), checkpoint.load_model(tuned_run / "remoe")
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-4, msg="tuned model logits vs transformers")
    results = json.loads((tuned_run / "remoe" / "results.json").read_text())
    assert list(results["stages"]) == ["0 base", "1 reuse-aware", "2 balance", "3 calibration"]
    s = results["summary"]
    assert s["reuse_change"] == pytest.approx(s["reuse_tuned"] / s["reuse_base"] - 1)
    assert hidden_files(tuned_run) == [] and not (tuned_run / "remoe.train-state.pt").exists()
    assert (tuned_run / "remoe" / "model.safetensors").stat().st_mode & 0o044 == 0o044  # a model is for sharing


def test_resume_after_interruption_gives_the_same_routers(tuned_run, corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(tuned_run / "base", out / "base")
    interrupt_call(monkeypatch, router, "reuse_loss", 3)  # during the third step of stage 1, after two saved steps
    with pytest.raises(SystemExit) as e:
        train.main(finetune_args(corpus, out))
    assert e.value.code == 130 and not (out / "remoe").exists()
    assert (out / "remoe.train-state.pt").exists()
    monkeypatch.undo()
    add_wall_seconds(out / "remoe.train-state.pt", 1000.0)
    train.main(finetune_args(corpus, out))
    assert not (out / "remoe.train-state.pt").exists()
    assert_same_routers(tuned_run / "remoe", out / "remoe")
    assert json.loads((out / "remoe" / "results.json").read_text())["wall_seconds"] >= 1000


def test_a_state_of_other_arguments_is_refused(tuned_run, corpus, tmp_path, monkeypatch, capsys):
    """Every argument that changes the result is in the state's key: a rerun that changes one is refused
    in one line naming the flag with both values, instead of mixing two runs; --no-resume starts over."""
    out = tmp_path / "run"
    shutil.copytree(tuned_run / "base", out / "base")
    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text(corpus.read_text() + "\n\none more paragraph\n")
    interrupt_call(monkeypatch, router, "reuse_loss", 3)
    with pytest.raises(SystemExit):
        train.main(finetune_args(corpus, out))
    monkeypatch.undo()
    changes = {  # extra flags (the later of a repeated flag wins) -> what the error must say
        "--data": (["--data", str(other_corpus)], f"{other_corpus.resolve()} (corpus"),
        "--seq-len": (["--seq-len", "16"], "--seq-len: 32 in the state, 16 now"),
        "--batch-size": (["--batch-size", "2"], "--batch-size: 4 in the state, 2 now"),
        "--anchor-weight": (["--anchor-weight", "0.5"], "--anchor-weight: 1.0 in the state, 0.5 now"),
        "--anchor": (["--anchor", "router-kl"], "--anchor: 'distill' in the state, 'router-kl' now"),
        "--window": (["--window", "2"], "--window: 1 in the state, 2 now"),
        "--balance": (["--balance", "sequence"], "--balance: 'switch' in the state, 'sequence' now"),
        "--seed": (["--seed", "1"], "--seed: 0 in the state, 1 now"),
        "--calib-split": (["--calib-split", "train"], "--calib-split: 'val' in the state, 'train' now"),
        "--lr": (["--lr", "0.001"], "--lr: 0.002 in the state, 0.001 now"),
    }
    for flag, (extra, message) in changes.items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            train.main(finetune_args(corpus, out, *extra))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (flag, err)
        # switching to router-kl also brings its --kl-margin into the key (it counts only for that anchor)
        assert message in err and err.count(" in the state, ") == 1 + (flag == "--anchor"), (flag, err)
        assert "--no-resume" in err, (flag, err)
    # the same folder holding another base model (here: one router changed) is another --model
    tensors = read_tensors(out / "base")
    name = next(k for k in tensors if k.endswith("mlp.gate.weight"))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, out / "base" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit):
        train.main(finetune_args(corpus, out))
    assert "--model: " in capsys.readouterr().err
    train.main(finetune_args(corpus, out, "--no-resume"))
    assert "resuming" not in capsys.readouterr().out and (out / "remoe" / "model.safetensors").exists()
    # a damaged state, or one that the previous remoe wrote (without a key), is refused too
    bad = tmp_path / "bad-state.pt"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(cli.UserError, match="unreadable training state .*; pass --no-resume to start over"):
        resume.load_state(bad, {"--seed": 0})
    torch.save({"run_key": {"world": 1}, "stage": 0}, bad)
    with pytest.raises(cli.UserError, match="not a training state that this version of remoe wrote"):
        resume.load_state(bad, {"--seed": 0})


def test_rerun_after_an_interrupted_export(tuned_run, corpus, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the tuned model is written: no temporary folder stays, and the rerun says that all
    stages are done (not "stage 4" of 3), exports, and gives the routers of an uninterrupted run."""
    out = tmp_path / "run"
    shutil.copytree(tuned_run / "base", out / "base")
    interrupt_call(monkeypatch, checkpoint, "save_file", 1)  # inside cli.atomic_write, after the hard links
    with pytest.raises(SystemExit) as e:
        train.main(finetune_args(corpus, out))
    assert e.value.code == 130 and not (out / "remoe").exists() and hidden_files(out) == []
    monkeypatch.undo()
    capsys.readouterr()
    train.main(finetune_args(corpus, out))
    assert "all 3 stages done, exporting" in capsys.readouterr().out
    assert_same_routers(tuned_run / "remoe", out / "remoe")


def test_resume_after_sigkill_is_bit_identical(base_run, corpus, tmp_path):
    """`python train.py` killed with SIGKILL once it has saved a state, then run again with the same
    command: the exported routers equal an uninterrupted run's bit for bit, and what a kill mid-write
    leaves (temporaries named after the dead process) is gone."""
    flags = ["--stage-steps", "30,5,10", "--threads", "1"]  # long enough to be killed mid-way
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    for d in (killed, whole):
        shutil.copytree(base_run / "base", d / "base")
    cmd = [sys.executable, str(REPO / "train.py"), *finetune_args(corpus, killed, *flags)]
    state_file = killed / "remoe.train-state.pt"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not state_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and state_file.exists()
    litter = [killed / f".remoe.train-state.pt.tmp-{proc.pid}-0000", killed / f".remoe.tmp-{proc.pid}-0000"]
    litter[0].write_bytes(b"half a state")
    litter[1].mkdir()
    (litter[1] / "model.safetensors").write_bytes(b"half a checkpoint")
    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming stage" in rerun.stdout
    train.main(finetune_args(corpus, whole, *flags))
    assert_same_routers(whole / "remoe", killed / "remoe")
    assert hidden_files(killed) == [] and not state_file.exists()


def test_export_of_a_sharded_checkpoint_rewrites_only_router_shards(tmp_path):
    _, path = make_checkpoint(tmp_path / "base", "qwen2_moe", max_shard_size="60KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    model = checkpoint.load_model(path)
    with torch.no_grad():
        for l in model.config.moe_layers:
            model.model.layers[l].mlp.gate.weight.add_(1.0)
    tuned_routers = {l: model.model.layers[l].mlp.gate.weight.detach() for l in model.config.moe_layers}
    checkpoint.export_tuned(path, tmp_path / "tuned", model.config, tuned_routers, {"note": "test"})
    router_shards = {index[f"model.layers.{l}.mlp.gate.weight"] for l in model.config.moe_layers}
    for shard in set(index.values()):
        same = os.path.samefile(path / shard, tmp_path / "tuned" / shard)
        assert same == (shard not in router_shards), shard
    tuned = checkpoint.load_model(tmp_path / "tuned")
    for l in model.config.moe_layers:
        assert torch.equal(tuned.model.layers[l].mlp.gate.weight, model.model.layers[l].mlp.gate.weight)


@pytest.mark.parametrize("mode, balance", [("ddp", "switch"), ("fsdp", "switch"), ("ddp", "sequence")])
def test_two_processes_match_one(base_run, corpus, tmp_path, mode, balance):
    """torchrun with 2 CPU processes over gloo, default --balance switch included: the routers of one
    process with the same global batch. Tolerance 1e-5: the routers move by ~8e-3 in these 4 steps
    (checked below to exceed 1e-3); the two runs differ only by float32 rounding of gradients summed in
    another order (measured 1e-8); with each process counting the switch loss's experts over its own
    half of the batch they differed by 6.5e-3, as much as the update itself."""
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(base_run / "base", d / "base")
    args = ["--balance", balance, "--stage-steps", "2,1,1"]
    train.main(finetune_args(corpus, one, *args))
    extra = ["--fsdp"] if mode == "fsdp" else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py"), *finetune_args(corpus, two, *args, *extra), "--threads", "1"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    start, a, b = routers(one / "base"), routers(one / "remoe"), routers(two / "remoe")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3
    for k in a:
        assert_close(b[k], a[k], atol=1e-5, msg=f"{mode} {balance} router {k}")


def test_bad_input_is_one_line(base_run, corpus, tmp_path):
    """The command line, for input that fails after the flags are read (each was a traceback or a
    misleading line once); the flags' own checks are test_bad_flags_are_refused_before_any_work."""
    (tmp_path / "empty").mkdir()
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps({"text": f"x = {i}"}) + "\n" for i in range(20)))
    model = ["--model", str(base_run / "base"), "--data", str(corpus), "--out", str(tmp_path / "out")]
    cases = {
        "missing model": (["--model", str(tmp_path / "missing")], "missing"),
        "--fsdp alone": ([*model, "--fsdp"], "--fsdp shards the model across the processes that torchrun starts"),
        "tiny corpus": ([*model, "--data", str(tiny)], "split has only"),
        "empty folder": ([*model, "--data", str(tmp_path / "empty")], "match --glob '**/*'; expected text files"),
    }
    assert_cli_errors(REPO / "train.py", cases, cwd=tmp_path)


def test_seq_len_beyond_the_context_is_refused(base_run, corpus, tmp_path, capsys):
    runs = [(train.main, ["--model", str(base_run / "base"), "--seq-len", "4096"], "--seq-len 4096 is longer than"),
            (train.main, ["--base-only", "--data", str(corpus), "--seq-len", "2048"],
             "--seq-len 2048 is longer than the base model's")]
    for main, argv, message in runs:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--stage-steps", "1,2"], "--stage-steps takes 3 comma-separated numbers (stages 1, 2, 3), got 2"),
    (["--stage-steps", "1,x,2"], "--stage-steps takes comma-separated numbers >= 0, got '1,x,2'"),
    (["--sweep", "0,-1"], "--sweep takes comma-separated numbers >= 0, got '0,-1'"),
    (["--lambda", "-1"], "--reuse-weight must be >= 0, got -1.0"),
    (["--window", "0"], "--window must be >= 1, got 0"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--model", "somewhere", "--rebuild-base"], "--rebuild-base pretrains the default base model, which --model"),
    (["--model", "somewhere", "--base-only"], "--base-only builds the default base model, which --model"),
    (["--reuse-cache", "-1"], "--reuse-cache must be >= 0, got -1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--vocab-size", "100"], "--vocab-size must be >= 257, got 100"),
    (["--pretrain-steps", "0"], "--pretrain-steps must be >= 1, got 0"),
    (["--base-overrides", "{oops"], "--base-overrides is not valid JSON"),
    (["--base-overrides", "[1]"], "--base-overrides must be a JSON object, got list"),
    (["--base-overrides", '{"experts": 4}'], "--base-overrides key 'experts' is not a key of DEFAULT_BASE"),
])
def test_bad_flags_are_refused_before_any_work(argv, message, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # as without torchrun
    with pytest.raises(cli.UserError) as e:
        train.prepare_flags(train.parse_args([*argv, "--out", str(tmp_path)]))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_under_torchrun_the_batch_must_split_evenly(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 tells each process
    with pytest.raises(cli.UserError, match=r"--batch-size 3 must be divisible by the number of processes \(2\)"):
        train.prepare_flags(train.parse_args(["--model", str(tmp_path), "--batch-size", "3", "--out", str(tmp_path)]))


def test_under_torchrun_the_default_base_is_built_first(tmp_path, monkeypatch):
    """torchrun's processes cannot all build the base model: the error names the one-process command."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for extra in ([], ["--base-only"]):
        with pytest.raises(cli.UserError) as e:
            train.prepare_flags(train.parse_args(["--batch-size", "4", "--out", str(tmp_path), *extra]))
        assert f"one process before torchrun: python train.py --base-only --out {tmp_path}" in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pretraining_and_remoe_run_on_cuda(corpus, tmp_path):
    """Everything where the tensors are: the base model pretrained, certified and tuned on the GPU (the random
    routers of the certificate included), with finite figures and a tuned checkpoint in which only routers
    differ."""
    argv = [a for a in SMALL_RUN if a not in ("--device", "cpu")] + ["--device", "cuda"]
    train.main(["--data", str(corpus), "--out", str(tmp_path), "--stage-steps", "2,1,1", *argv])
    base = json.loads((tmp_path / "base" / "results.json").read_text())["test"]
    tuned = json.loads((tmp_path / "remoe" / "results.json").read_text())
    assert math.isfinite(base["perplexity"]) and math.isfinite(base["ablations"]["random_router"])
    assert all(math.isfinite(v) for v in tuned["summary"].values() if isinstance(v, float))
    base_t, tuned_t = read_tensors(tmp_path / "base"), read_tensors(tmp_path / "remoe")
    assert {k for k in base_t if not torch.equal(base_t[k], tuned_t[k])} <= {k for k in base_t if k.endswith("mlp.gate.weight")}


def test_sweep_prints_one_row_per_lambda(base_run, corpus, tmp_path, capsys):
    shutil.copytree(base_run / "base", tmp_path / "base")
    train.main(finetune_args(corpus, tmp_path, "--stage-steps", "1,1,1", "--sweep", "0,0.5"))
    out = capsys.readouterr().out
    table = out[out.index("lambda  reuse"):].splitlines()
    assert [row.split()[0] for row in table[1:3]] == ["0", "0.5"]
    for lam in ("0", "0.5"):
        assert (train.sweep_dir(tmp_path, "distill", float(lam)) / "remoe" / "model.safetensors").exists()


@pytest.mark.parametrize("anchor", ["distill", "router-kl"])
def test_the_reuse_loss_raises_reuse_over_the_control(anchor, base_run, corpus, tmp_path, capsys):
    """ReMoE does what it claims: the same pipeline with lambda > 0 ends with a higher reuse rate on the
    test windows than with lambda = 0 (the control), under either anchor. Fails if the reuse loss stops
    pulling router mass onto the previous token's experts."""
    shutil.copytree(base_run / "base", tmp_path / "base")
    train.main(finetune_args(corpus, tmp_path, "--stage-steps", "12,0,0", "--lr", "0.02", "--anchor", anchor,
                             "--eval-windows", "8", "--sweep", "0,2"))
    capsys.readouterr()
    reuse = {}
    for lam in (0.0, 2.0):
        results = json.loads((train.sweep_dir(tmp_path, anchor, lam) / "remoe" / "results.json").read_text())
        reuse[lam] = results["summary"]["reuse_tuned"]
    assert reuse[2.0] > reuse[0.0] + 0.05, reuse  # 8 windows x 31 tokens x 2 layers: sampling noise ~0.02


def test_training_for_the_cache_raises_its_hit_rate(base_run, corpus, tmp_path, capsys):
    """--reuse-set cache: R_t is what an LRU cache of --reuse-cache experts holds before each token. The
    same pipeline with lambda > 0 ends with a higher LRU hit rate at that cache size than with lambda = 0."""
    shutil.copytree(base_run / "base", tmp_path / "base")
    train.main(finetune_args(corpus, tmp_path, "--stage-steps", "12,0,0", "--lr", "0.02", "--reuse-set", "cache",
                             "--reuse-cache", "4", "--eval-windows", "8", "--sweep", "0,2"))
    capsys.readouterr()
    hit = {}
    for lam in (0.0, 2.0):
        folder = train.sweep_dir(tmp_path, "distill", lam, "cache")
        assert folder.name == f"distill-cache-lambda{lam:g}"
        hit[lam] = json.loads((folder / "remoe" / "results.json").read_text())["summary"]["lru_hit_tuned"]
    assert hit[2.0] > hit[0.0] + 0.05, hit  # 8 windows x 31 tokens x 2 layers: sampling noise ~0.02


def test_gradient_checkpointing_gives_the_same_router_gradients(base_run):
    grads = []
    for recompute in (False, True):
        model = checkpoint.load_model(base_run / "base").train()
        model.gradient_checkpointing = recompute
        gates = train.router_parameters(model)
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
        logits, routing = model(ids, return_routing=True)
        (logits.logsumexp(-1).mean() + router.reuse_loss(routing)).backward()
        grads.append([g.weight.grad.clone() for g in gates])
    for a, b in zip(*grads):
        assert_close(b, a, atol=1e-6, msg="router gradient with checkpointing")


def test_imports_run_one_way():
    """Every project file imports only files on lower floors, so there is no circle of imports: cli.py (errors,
    flags, atomic writes) at the bottom, then model.py, then checkpoint.py; router.py imports nothing of the
    project; resume.py and distributed.py (train.py's infrastructure) only cli.py; stats.py nothing; data.py,
    cache.py, store.py and export.py the files below them; record.py (an offloaded run's counts) cache.py; budget.py
    (sizing the cache) the low files and store.py; testbed.py and offload_infer.py files below them; latency.py
    (the predicted time per token, measured through the engine's loader) cache.py, store.py, stats.py,
    checkpoint.py and offload_infer.py; train.py and bench.py, the top, are imported by none. Imports inside functions count too."""
    low = {"cli", "model", "checkpoint"}
    allowed = {"cli": set(), "model": set(), "checkpoint": {"cli", "model"}, "router": set(), "data": {"cli"},
               "resume": {"cli"}, "distributed": {"cli"}, "cache": low, "store": low, "stats": set(), "export": low,
               "record": {"cache"}, "budget": low | {"store"}, "offload_infer": low | {"cache", "store", "record", "budget"},
               "testbed": low | {"data", "router", "cache", "resume"},
               "train": low | {"data", "router", "testbed", "cache", "resume", "distributed"},
               "latency": {"cache", "store", "stats", "cli", "checkpoint", "offload_infer"},
               "bench": low | {"data", "router", "testbed", "cache", "store", "stats", "offload_infer", "record", "export",
                               "budget", "latency"}}
    project = {p.stem for p in REPO.glob("*.py")}
    assert project == set(allowed), "a new file needs its floor here"
    for name, below in allowed.items():
        tree = ast.parse((REPO / f"{name}.py").read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert imported & project <= below, (name, sorted(imported & project - below))
