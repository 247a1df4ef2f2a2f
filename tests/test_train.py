"""train.py: the base model it builds loads in transformers with the same logits; ReMoE trains only
the routers, exports a checkpoint in which only router tensors differ, resumes after an interruption,
and gives the same routers in 2 data-parallel processes as in one with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import model as remoe
import train
from tiny import SMALL_RUN, assert_close, load_oracle, make_checkpoint, read_tensors

REPO = Path(__file__).resolve().parent.parent

def test_base_model_is_a_hugging_face_checkpoint(base_run):
    base = base_run / "base"
    assert {"config.json", "model.safetensors", "tokenizer.json", "results.json"} <= {f.name for f in base.iterdir()}
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2" and cfg["n_routed_experts"] == 8
    hf = load_oracle(base)
    ours = remoe.load_model(base)
    ids = torch.randint(0, cfg["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-4, msg="base model logits vs transformers")
    results = json.loads((base / "results.json").read_text())
    t = results["test"]
    assert t["unigram_loss"] > 0 and len(t["load_max_over_mean"]) == 2 and 0 <= t["reuse"]["1"] <= 1


def test_second_run_reuses_the_base(base_run, corpus, capsys):
    before = (base_run / "base" / "model.safetensors").stat().st_mtime_ns
    train.main(["--data", str(corpus), "--out", str(base_run), "--base-only", *SMALL_RUN])
    assert "using the default base model" in capsys.readouterr().out
    assert (base_run / "base" / "model.safetensors").stat().st_mtime_ns == before


def test_only_router_parameters_get_gradients(base_run):
    model = remoe.load_model(base_run / "base")
    gates = train.router_parameters(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    logits, routing = model(ids, return_routing=True)
    import router
    (logits.logsumexp(-1).mean() + router.reuse_loss(routing)).backward()
    trained = {id(g.weight) for g in gates}
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert len(gates) == len(model.config.moe_layers)


def finetune_args(corpus, out, *extra):
    return ["--model", str(out / "base"), "--data", str(corpus), "--out", str(out),
            "--stage-steps", "3,1,2", "--save-every", "1", "--batch-size", "4", "--seq-len", "32",
            "--eval-windows", "4", "--seed", "0", *extra]


def routers(folder):
    with safe_open(Path(folder) / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.endswith("mlp.gate.weight")}


@pytest.fixture(scope="session")
def tuned_run(base_run, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned")
    shutil.copytree(base_run / "base", out / "base")
    train.main(finetune_args(corpus, out))
    return out


def test_export_changes_only_routers_and_loads_in_transformers(tuned_run):
    base, tuned = read_tensors(tuned_run / "base"), read_tensors(tuned_run / "remoe")
    assert base.keys() == tuned.keys()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.endswith("mlp.gate.weight") for k in changed)
    # files without routers are hard links to the base model's
    assert os.path.samefile(tuned_run / "base" / "tokenizer.json", tuned_run / "remoe" / "tokenizer.json")
    hf, ours = load_oracle(tuned_run / "remoe"), remoe.load_model(tuned_run / "remoe")
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-4, msg="tuned model logits vs transformers")
    results = json.loads((tuned_run / "remoe" / "results.json").read_text())
    assert list(results["stages"]) == ["0 base", "1 reuse-aware", "2 balance", "3 calibration"]
    s = results["summary"]
    assert s["reuse_change"] == pytest.approx(s["reuse_tuned"] / s["reuse_base"] - 1)


def test_resume_after_interruption_gives_the_same_routers(tuned_run, corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(tuned_run / "base", out / "base")
    import router
    real, calls = router.reuse_loss, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # during the third step of stage 1, after two saved steps
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(router, "reuse_loss", interrupted)
    with pytest.raises(SystemExit) as e:
        train.main(finetune_args(corpus, out))
    assert e.value.code == 130 and not (out / "remoe").exists()
    assert (out / "remoe.train-state.pt").exists()
    monkeypatch.setattr(router, "reuse_loss", real)
    train.main(finetune_args(corpus, out))
    assert not (out / "remoe.train-state.pt").exists()
    for k, w in routers(tuned_run / "remoe").items():
        assert torch.equal(routers(out / "remoe")[k], w), k


def test_export_of_a_sharded_checkpoint_rewrites_only_router_shards(tmp_path):
    _, path = make_checkpoint(tmp_path / "base", "qwen2_moe", max_shard_size="60KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    model = remoe.load_model(path)
    with torch.no_grad():
        for l in model.config.moe_layers:
            model.model.layers[l].mlp.gate.weight.add_(1.0)
    routers = {l: model.model.layers[l].mlp.gate.weight.detach() for l in model.config.moe_layers}
    train.export_tuned(path, tmp_path / "tuned", model.config, routers, {"note": "test"})
    router_shards = {index[f"model.layers.{l}.mlp.gate.weight"] for l in model.config.moe_layers}
    for shard in set(index.values()):
        same = os.path.samefile(path / shard, tmp_path / "tuned" / shard)
        assert same == (shard not in router_shards), shard
    tuned = remoe.load_model(tmp_path / "tuned")
    for l in model.config.moe_layers:
        assert torch.equal(tuned.model.layers[l].mlp.gate.weight, model.model.layers[l].mlp.gate.weight)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(base_run, corpus, tmp_path, mode):
    """torchrun with 2 CPU processes over gloo: same routers as one process with the same global batch."""
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(base_run / "base", d / "base")
    args = ["--balance", "sequence", "--stage-steps", "2,1,1"]
    train.main(finetune_args(corpus, one, *args))
    extra = ["--fsdp"] if mode == "fsdp" else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py"), *finetune_args(corpus, two, *args, *extra), "--threads", "1"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = routers(one / "remoe"), routers(two / "remoe")
    for k in a:
        assert_close(b[k], a[k], atol=1e-5, msg=f"{mode} router {k}")


def test_bad_input_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "train.py"), "--model", str(tmp_path / "missing")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().startswith("error:") and "missing" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_pretraining_resumes_after_interruption(base_run, corpus, tmp_path, monkeypatch):
    """Kill pretraining mid-way; the same command resumes from the saved state and ends with the
    same weights as the uninterrupted run."""
    import router
    real, calls = router.balance_loss, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    args = ["--data", str(corpus), "--out", str(tmp_path), "--base-only", *SMALL_RUN, "--save-every", "1"]
    monkeypatch.setattr(router, "balance_loss", interrupted)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 130 and not (tmp_path / "base").exists()
    assert (tmp_path / "base.pretrain-state.pt").exists()
    monkeypatch.setattr(router, "balance_loss", real)
    train.main(args)
    assert not (tmp_path / "base.pretrain-state.pt").exists()
    a, b = read_tensors(base_run / "base"), read_tensors(tmp_path / "base")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sweep_prints_one_row_per_lambda(base_run, corpus, tmp_path, capsys):
    shutil.copytree(base_run / "base", tmp_path / "base")
    train.main(finetune_args(corpus, tmp_path, "--stage-steps", "1,1,1", "--sweep", "0,0.5"))
    out = capsys.readouterr().out
    table = out[out.index("lambda  reuse"):].splitlines()
    assert [row.split()[0] for row in table[1:3]] == ["0", "0.5"]
    for lam in ("0", "0.5"):
        assert (tmp_path / f"sweep-lambda{lam}" / "remoe" / "model.safetensors").exists()


def test_gradient_checkpointing_gives_the_same_router_gradients(base_run):
    grads = []
    for recompute in (False, True):
        model = remoe.load_model(base_run / "base").train()
        model.gradient_checkpointing = recompute
        gates = train.router_parameters(model)
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
        logits, routing = model(ids, return_routing=True)
        import router
        (logits.logsumexp(-1).mean() + router.reuse_loss(routing)).backward()
        grads.append([g.weight.grad.clone() for g in gates])
    for a, b in zip(*grads):
        assert_close(b, a, atol=1e-6, msg="router gradient with checkpointing")
