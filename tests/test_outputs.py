"""Outputs, runs, signals, training and data (issue 23): training stops at the first NaN or Inf with
the last good state kept and nothing written; no output lands in or on an input; outputs are checked
writable before the work; a state file is loaded with weights_only=True, after the flags are checked;
one run per output folder; Ctrl-C, a full disk, a read-only file system, a refused permission and
running out of memory end every script in one `error:` line with nothing left behind; and a corpus
with a lone surrogate, a deep JSON line, a cut token cache, a --glob reaching outside --data or a
stray non-UTF-8 byte is handled, each in the way it names."""

import errno
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import checkpoint
import cli
import data
import export
import offload_infer
import resume
import router
import train
from data import DataConfig, load_corpus, prepare_data
from tiny import SMALL_RUN, finetune_args

MODEL = "ds2-mla-greedy"  # a tiny checkpoint every script accepts


def run(main, argv, capsys):
    """main(argv) that must end the program: (exit status, its one `error:` line)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return e.value.code, lines[0]


def hidden_files(folder):
    """What an atomic write leaves when it does not clean up: names starting with a dot."""
    return sorted(p.name for p in Path(folder).rglob(".*"))


def on_call(monkeypatch, module, name, n, effect):
    """The n-th call of module.name raises `effect` (an exception) or returns effect(its result)."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n and isinstance(effect, BaseException):
            raise effect
        result = real(*args, **kwargs)
        return effect(result) if calls["n"] == n else result

    monkeypatch.setattr(module, name, wrapper)


@pytest.fixture
def run_dir(base_run, tmp_path):
    """OUT with a copy of the small base model in OUT/base, for a short ReMoE run."""
    shutil.copytree(base_run / "base", tmp_path / "base")
    return tmp_path


@pytest.fixture
def model_copy(tiny, tmp_path):
    """A copy of a tiny checkpoint that a test may see destroyed, with its bytes to compare."""
    folder = tmp_path / "model"
    shutil.copytree(tiny(MODEL)[1], folder)
    return folder, {f.name: f.read_bytes() for f in folder.iterdir()}


# ----------------------------------------------------------------------------------------------
# 1. Training stops at the first non-finite loss or router, keeping the last good state

def test_a_nan_loss_stops_finetuning_and_keeps_the_last_good_state(run_dir, corpus, monkeypatch, capsys):
    """The reuse loss is NaN in step 3 of stage 1 (states saved after steps 1 and 2): the run stops in one
    line, writes no remoe/ and no results.json, and the state of step 2 is kept, finite."""
    on_call(monkeypatch, router, "reuse_loss", 3, lambda loss: loss * float("nan"))
    code, line = run(train.main, finetune_args(corpus, run_dir), capsys)
    assert code == 2 and "NaN or Inf" in line and "step 2" in line and "remoe.train-state.pt" in line
    assert not (run_dir / "remoe").exists() and not list(run_dir.rglob("results.json"))[1:]  # only base's
    state = torch.load(run_dir / "remoe.train-state.pt", weights_only=True)
    assert state["progress"]["step"] == 2 and all(torch.isfinite(t).all() for t in state["tensors"].values())
    assert hidden_files(run_dir) == []


def test_a_router_turned_inf_stops_finetuning(run_dir, corpus, monkeypatch, capsys):
    """Finite losses, but a router weight becomes Inf after the first step of stage 2 (the optimizer's
    doing): the state of stage 2 is never saved with it, and nothing is exported."""
    model = {}
    real_step = train.train_step

    def step(cfg, procs, *args, **kwargs):
        out = real_step(cfg, procs, *args, **kwargs)
        model["n"] = model.get("n", 0) + 1
        if model["n"] == 4:  # stage 2's first step
            with torch.no_grad():
                procs.model.moes()[0].gate.weight[0, 0] = float("inf")
        return out

    monkeypatch.setattr(train, "train_step", step)
    code, line = run(train.main, finetune_args(corpus, run_dir), capsys)
    assert code == 2 and "NaN or Inf" in line
    assert not (run_dir / "remoe").exists()
    state = torch.load(run_dir / "remoe.train-state.pt", weights_only=True)
    assert state["progress"] == {**state["progress"], "stage": 1, "step": 0}  # after stage 1, before stage 2
    assert all(torch.isfinite(t).all() for t in state["tensors"].values())


def test_a_nan_loss_stops_pretraining_before_the_base_is_written(corpus, tmp_path, monkeypatch, capsys):
    on_call(monkeypatch, router, "balance_loss", 3, lambda loss: loss * float("inf"))
    code, line = run(train.main, ["--base-only", "--data", str(corpus), "--out", str(tmp_path), *SMALL_RUN,
                                  "--save-every", "1"], capsys)
    assert code == 2 and "NaN or Inf" in line and "step 2" in line
    assert not (tmp_path / "base").exists()
    state = torch.load(tmp_path / "base.pretrain-state.pt", weights_only=True)
    assert state["progress"] == {"step": 2} and all(torch.isfinite(t).all() for t in state["tensors"].values())


# ----------------------------------------------------------------------------------------------
# 2. No output in or on an input; outputs checked writable before the work

def test_export_refuses_to_write_into_its_input_model(model_copy, capsys):
    folder, before = model_copy
    code, line = run(export.main, [str(folder), "--gguf", str(folder / "model.safetensors")], capsys)
    assert code == 2 and "lies inside the input folder" in line
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before


def test_offload_json_refused_before_any_work(model_copy, tmp_path, monkeypatch, capsys):
    """--json on the model's config.json, on a folder, under a file or where nothing may be written: refused
    in one line before the engine is built (so no generation is lost at its last write)."""
    folder, before = model_copy

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine was built before --json was checked")

    monkeypatch.setattr(offload_infer, "OffloadEngine", no_engine)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path / "locked" and real_access(p, mode))
    cases = {folder / "config.json": "lies inside the input folder",
             tmp_path: "is a folder, expected a file name",
             tmp_path / "a-file" / "x.json": "lies under",
             tmp_path / "locked" / "x.json": "cannot write in"}
    for path, message in cases.items():
        code, line = run(offload_infer.main, ["--model", str(folder), "--prompt-ids", "1,2", "--max-new-tokens", "2",
                                              "--json", str(path)], capsys)
        assert code == 2 and message in line and f"--json {path}" in line, line
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before


def test_train_out_must_not_be_the_input_model_nor_a_file(run_dir, corpus, capsys):
    model = run_dir / "base"
    code, line = run(train.main, [*finetune_args(corpus, run_dir), "--out", str(model)], capsys)
    assert code == 2 and "--out" in line and "is the input folder" in line
    assert not (model / "remoe").exists() and not (model / ".lock").exists()
    (run_dir / "a-file").write_text("x")
    code, line = run(train.main, [*finetune_args(corpus, run_dir), "--out", str(run_dir / "a-file")], capsys)
    assert code == 2 and "is a file, expected a folder" in line


def test_bench_out_must_not_lie_inside_a_model(model_copy, capsys):
    folder, _ = model_copy
    code, line = run(bench.main, ["--base", str(folder), "--tuned", str(folder), "--out", str(folder / "bench")], capsys)
    assert code == 2 and "--out" in line and "lies inside the input folder" in line
    assert not (folder / "bench").exists()


# ----------------------------------------------------------------------------------------------
# 3. A state file runs no code, and is read only after the flags are checked

class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_in_the_state_file_runs_no_code(run_dir, corpus, capsys):
    marker = run_dir / "pwned"
    (run_dir / "remoe.train-state.pt").write_bytes(pickle.dumps({"key": Planted(marker)}))
    code, line = run(train.main, [*finetune_args(corpus, run_dir), "--lr", "0"], capsys)
    assert code == 2 and "--lr" in line and not marker.exists()  # the flags first
    code, line = run(train.main, finetune_args(corpus, run_dir), capsys)
    assert code == 2 and "unreadable training state" in line and "--no-resume" in line
    assert not marker.exists() and not (run_dir / "remoe").exists()


def test_a_genuine_state_loads_with_weights_only(tmp_path):
    """What TrainingState saves (tensors, AdamW's state, the generator's RNG state) loads under
    weights_only=True into a fresh optimizer and generator."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt, gen = torch.optim.AdamW([w], lr=0.1), torch.Generator().manual_seed(3)
    w.sum().backward()
    opt.step()
    torch.randn(5, generator=gen)
    state = resume.TrainingState(tmp_path / "s.pt", {"--seed": 0})
    state.resume({"w": w}, opt, gen)
    state.save(step=7, reports={"0 base": {"loss": 1.5}})
    w2 = torch.nn.Parameter(torch.zeros(4, 3))
    opt2, gen2 = torch.optim.AdamW([w2], lr=0.1), torch.Generator()
    again = resume.TrainingState(tmp_path / "s.pt", {"--seed": 0})
    assert again.resume({"w": w2}, opt2, gen2) == {"step": 7, "reports": {"0 base": {"loss": 1.5}}}
    assert torch.equal(w2, w) and torch.equal(gen2.get_state(), gen.get_state())
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


# ----------------------------------------------------------------------------------------------
# 4. One run per output folder

def test_a_live_run_holds_its_folder_and_a_stale_lock_is_taken_over(run_dir, corpus, capsys):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".lock").write_text(f"pid {live.pid} on {socket.gethostname()} since 2026-01-01 00:00:00\n")
        for extra in ([], ["--no-resume"]):
            code, line = run(train.main, [*finetune_args(corpus, run_dir), *extra], capsys)
            assert code == 2 and f"pid {live.pid}" in line and "in use by another run" in line
            assert not (run_dir / "remoe").exists() and not (run_dir / "remoe.train-state.pt").exists()
    finally:
        live.kill()
        live.wait()
    # its process is gone: the lock is stale, the next run takes it over and removes it at the end
    train.main(finetune_args(corpus, run_dir))
    assert (run_dir / "remoe" / "model.safetensors").is_file() and not (run_dir / ".lock").exists()


def test_the_lock_names_this_process_while_it_runs(tmp_path):
    with cli.run_lock(tmp_path):
        assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()} on {socket.gethostname()} since ")
        with pytest.raises(cli.UserError, match=f"pid {os.getpid()}"):
            with cli.run_lock(tmp_path):
                pass
    assert not (tmp_path / ".lock").exists()


# ----------------------------------------------------------------------------------------------
# 5. Ctrl-C, a full disk, a read-only file system, no permission, no memory: one line, nothing left

MACHINES = {  # case: (the exception, exit status, what the line says)
    "ctrl-c": (lambda: KeyboardInterrupt(), 130, "interrupted (Ctrl-C)"),
    "disk full": (lambda: OSError(errno.ENOSPC, "No space left on device"), 1, "the disk is full"),
    "read-only": (lambda: OSError(errno.EROFS, "Read-only file system"), 1, "read-only"),
    "permission": (lambda: PermissionError(errno.EACCES, "Permission denied"), 1, "permission denied"),
    "memory": (lambda: MemoryError(), 1, "out of memory"),
}


def machine(case):
    make, status, message = MACHINES[case]
    return make(), status, message  # a new exception each time: atomic_write names its file in it


@pytest.mark.parametrize("case", MACHINES)
def test_export_ends_in_one_line_and_leaves_nothing(case, base_run, tmp_path, monkeypatch, capsys):
    exc, status, message = machine(case)
    on_call(monkeypatch, export, "encode", 2, exc)  # midway through the tensors
    out = tmp_path / "out" / "m.gguf"
    code, line = run(export.main, [str(base_run / "base"), "--gguf", str(out)], capsys)
    assert code == status and message in line
    assert list((tmp_path / "out").iterdir()) == []  # no half-written file, no temporary
    if isinstance(exc, OSError):
        assert str(out) in line  # the output named, not its temporary


def raises(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


@pytest.mark.parametrize("case", ["ctrl-c", "memory", "disk full"])
def test_offload_infer_ends_in_one_line(case, tiny, tmp_path, monkeypatch, capsys):
    """Ctrl-C or no memory while generating, a full disk at the --json write: one line, no litter."""
    exc, status, message = machine(case)
    if case == "disk full":
        monkeypatch.setattr(Path, "write_text", raises(exc))
    else:
        monkeypatch.setattr(offload_infer.OffloadEngine, "generate", raises(exc))
    code, line = run(offload_infer.main, ["--model", str(tiny(MODEL)[1]), "--prompt-ids", "1,2", "--max-new-tokens",
                                          "2", "--json", str(tmp_path / "d.json")], capsys)
    assert code == status and message in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["ctrl-c", "memory"])
def test_checkpoint_generate_ends_in_one_line(case, tiny, monkeypatch, capsys, tmp_path):
    exc, status, message = machine(case)
    exc = torch.OutOfMemoryError("CUDA out of memory") if case == "memory" else exc
    folder = with_tokenizer(tiny, tmp_path)
    on_call(monkeypatch, checkpoint, "generate", 1, exc)
    code, line = run(checkpoint.main, ["--model", str(folder), "--prompt", "hello world"], capsys)
    assert code == status and message in line


@pytest.mark.parametrize("case", ["disk full", "read-only"])
def test_train_on_a_full_or_read_only_disk_ends_in_one_line(case, run_dir, corpus, monkeypatch, capsys):
    """The second state save fails: one line naming the state file, the first state kept, no temporaries."""
    exc, status, message = machine(case)
    on_call(monkeypatch, Path, "write_bytes", 2, exc)
    code, line = run(train.main, finetune_args(corpus, run_dir), capsys)
    assert code == status and message in line and "remoe.train-state.pt" in line
    assert hidden_files(run_dir) == [] and not (run_dir / "remoe").exists()
    assert torch.load(run_dir / "remoe.train-state.pt", weights_only=True)["progress"]["step"] == 1


# ----------------------------------------------------------------------------------------------
# 6. An empty prompt

def with_tokenizer(tiny, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / "with-tokenizer"
    shutil.copytree(tiny(MODEL)[1], folder)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_checkpoint_cli_empty_prompt_is_one_line(tiny, tmp_path, capsys):
    code, line = run(checkpoint.main, ["--model", str(with_tokenizer(tiny, tmp_path)), "--prompt", ""], capsys)
    assert code == 2 and line == "error: the prompt is empty"


# ----------------------------------------------------------------------------------------------
# 7. Data

def write_corpus(folder, n=40):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"f{i:02d}.txt").write_text(f"def f_{i}(x):\n    return x * {i}\n" * 20)
    return folder


@pytest.mark.parametrize("line, expected", [
    ('{"text": "a \\ud800 b"}', "lone surrogate"),
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
])
def test_jsonl_lone_surrogate_or_deep_line_names_file_and_line(tmp_path, line, expected):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(cli.UserError) as e:
        load_corpus(DataConfig(data=str(path)))
    assert str(e.value).startswith(f"{path}:2: ") and expected in str(e.value) and "\n" not in str(e.value)


def test_glob_outside_data_is_refused(tmp_path):
    write_corpus(tmp_path / "corpus")
    (tmp_path / "secret.txt").write_text("not part of the corpus\n" * 50)
    for pattern in ("../*.txt", str(tmp_path / "*.txt")):
        with pytest.raises(cli.UserError, match="reaches outside --data"):
            load_corpus(DataConfig(data=str(tmp_path / "corpus"), glob=pattern))


def test_one_bad_byte_keeps_the_file_and_is_counted(tmp_path, capsys):
    folder = write_corpus(tmp_path / "corpus")
    (folder / "f00.txt").write_bytes((folder / "f00.txt").read_bytes() + b"\xff tail\n")
    corpus = load_corpus(DataConfig(data=str(folder)))
    texts = {n: t for s in data.SPLITS for n, t in getattr(corpus, s)}
    assert len(texts) == 40 and texts["f00.txt"].endswith("\ufffd tail\n") and corpus.repaired == 1
    assert "1 file(s)" in capsys.readouterr().err


def test_a_token_cache_cut_by_one_byte_is_rebuilt(tmp_path, capsys):
    cfg, out = DataConfig(data=str(write_corpus(tmp_path / "corpus")), vocab_size=300), tmp_path / "out"
    _, _, first = prepare_data(cfg, out)
    train_bin = next(out.glob("train-*.bin"))
    train_bin.write_bytes(train_bin.read_bytes()[:-1])
    capsys.readouterr()
    _, _, again = prepare_data(cfg, out)
    assert "is damaged" in capsys.readouterr().err and np.array_equal(first.train, again.train)
    assert train_bin.stat().st_size == first.train.nbytes


def test_atomic_write_names_the_cause_that_libraries_hide(tmp_path, monkeypatch):
    """safetensors reports a full disk in its message, numpy's tofile with errno None: either becomes an
    OSError naming the output (not its temporary), which fatal_errors prints in one line."""
    from safetensors import SafetensorError

    out = tmp_path / "m.safetensors"
    with pytest.raises(OSError) as e:
        with cli.atomic_write(out):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    with pytest.raises(OSError) as e:
        with cli.atomic_write(out) as tmp:
            raise OSError(None, None, str(tmp))  # what numpy's tofile raises on a full disk
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out) and list(tmp_path.iterdir()) == []
