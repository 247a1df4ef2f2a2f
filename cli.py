"""
cli.py: what every script shares, apart from the concepts: where the default models live, how bad
input ends a program (one `error:` line, status 2, never a traceback), how flags are parsed, how the
compute device and dtype are chosen, and how files are written (atomically: a reader sees the old
version or the new one, never half of one). The lowest file: it imports nothing of the project.
"""

import argparse
import dataclasses
import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------
# Where the default models live

DEFAULT_RUN = Path("runs/default")           # `python train.py` writes here: data/, base/, remoe/
DEFAULT_BASE_DIR = DEFAULT_RUN / "base"      # the default base model (testbed.py builds it)
DEFAULT_TUNED_DIR = DEFAULT_RUN / "remoe"    # its ReMoE-tuned twin (train.py)


def default_model_dir():
    """The model a script uses when none is given: the tuned default if train.py made one, else the base."""
    return DEFAULT_TUNED_DIR if DEFAULT_TUNED_DIR.is_dir() else DEFAULT_BASE_DIR


# ----------------------------------------------------------------------------------------------
# Bad input: one line, status 2

class UserError(Exception):
    """Bad input: a file, key, flag or value that is not what was expected. The message is one line
    that names it and says what was expected; `user_errors` turns it into that line and exit status 2."""


@contextmanager
def user_errors():
    """Around a script's work: a UserError ends the program with `error: <message>` and status 2,
    never a traceback."""
    try:
        yield
    except UserError as e:
        message = str(e)
        message = " ".join(w if len(w) <= 160 else f"{w[:100]}...{w[-57:]}" for w in message.split(" "))
        if len(message) > 600:  # a 200 KB tensor name is cut above; a message stays a few hundred characters
            message = f"{message[:400]}...{message[-197:]}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


# what the machine, not the input, can stop a script with: these reach the user as one line, not a traceback
MACHINE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted", errno.EISDIR: "it is a folder, expected a file",
                  errno.ENOTDIR: "a part of the path is a file, not a folder"}


@contextmanager
def fatal_errors():
    """Around a script's work, inside user_errors: what stops it from outside its input, Ctrl-C, a full
    disk, a read-only file system, a refused permission, running out of memory, ends the program with one
    `error:` line and a non-zero status (130 for Ctrl-C), never a traceback. Outputs are written with
    atomic_write, so nothing half-written is left behind."""
    try:
        yield
    except KeyboardInterrupt:
        print("\nerror: interrupted (Ctrl-C); no file was left half-written", file=sys.stderr)
        sys.exit(130)
    except (MemoryError, torch.OutOfMemoryError) as e:
        device = "the GPU" if isinstance(e, torch.OutOfMemoryError) else "the machine"
        print(f"error: out of memory on {device}; try a smaller model, batch or --max-new-tokens", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if e.errno not in MACHINE_ERRNOS:
            raise
        print(f"error: {e.filename or 'writing'}: {MACHINE_ERRNOS[e.errno]} ({e.strerror})", file=sys.stderr)
        sys.exit(1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported like every other bad input: one `error:` line, status 2
    (argparse's own prints the whole usage first); --help still shows the usage."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Device and dtype, decided once per run and printed with the reason

def pick_device(requested=None):
    """(device, reason): the --device flag when given, else CUDA when present, else the CPU."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise UserError(f"--device must be cpu, cuda or cuda:N, got {requested!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {requested} was requested but no CUDA device is available")
        return device, "requested with --device"
    if torch.cuda.is_available():
        return torch.device("cuda"), "a CUDA device is available"
    return torch.device("cpu"), "no CUDA device is available"


def pick_dtype(device, stored=torch.float32, requested=None):
    """(compute dtype, reason), decided once per run. On the CPU float32, since bfloat16 matmuls run
    about 100x slower there; on CUDA the checkpoint's own dtype (`stored`), with FP8 computed in bfloat16."""
    if requested:
        dtype = getattr(torch, str(requested), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise UserError(f"--dtype must be float32, bfloat16 or float16, got {requested!r}")
        return dtype, "requested with --dtype"
    if torch.device(device).type == "cpu":
        return torch.float32, "float32 on the CPU, where 16-bit matmuls are ~100x slower"
    if stored in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.bfloat16, "FP8 weights are computed in bfloat16"
    return stored, f"the checkpoint's own dtype ({str(stored).removeprefix('torch.')})"


# ----------------------------------------------------------------------------------------------
# Files written atomically

@contextmanager
def atomic_write(path):
    """Yields a temporary path beside `path`; when the block ends without error it is renamed onto
    `path` (a file, or a folder the block created), so a reader sees the old version or the new one,
    never half of one. On error, Ctrl-C included, the temporary is removed; what a killed process left
    behind is removed by the next write to the same path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():  # a folder cannot be renamed onto another: move the old one aside
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        err = write_error(e, path, tmp)
        if err is e:
            raise
        raise err from e


def write_error(e, path, tmp):
    """The error of a failed write to `path`, as an OSError naming `path` (not its temporary) wherever
    the cause is known: safetensors reports it in its message ("os error 28"), numpy's tofile loses the errno."""
    code = re.search(r"\(os error (\d+)\)", str(e)) if not isinstance(e, OSError) else None
    if code:
        return OSError(int(code[1]), os.strerror(int(code[1])), str(path))
    if not isinstance(e, OSError):
        return e
    if e.errno is None and shutil.disk_usage(path.parent).free < 1 << 20:  # numpy: only "full" fits
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if not e.filename or tmp.name in str(e.filename):
        e.filename = str(path)
    return e


def remove_stale_temps(path):
    """Remove the temporaries of writes to `path` whose process is gone (killed mid-write), and put
    back a folder that was moved aside when the process died between the two renames."""
    for tmp in path.parent.glob(f".{path.name}.*-*-*"):
        kind, pid = tmp.name[len(path.name) + 2:].split("-")[:2]
        if kind not in ("tmp", "old") or not pid.isdigit() or pid_alive(int(pid)):
            continue
        if kind == "old" and not path.exists():
            os.replace(tmp, path)
        elif tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def check_output(path, flag, inputs=(), folder=False):
    """Before any work, so that a long run is not lost at its last write: `path` (a file, or a folder when
    `folder`) is neither one of the `inputs` (files or model folders) nor inside one, is not a file where a
    folder is expected or the reverse, and can be created or replaced where it is."""
    path, full = Path(path), Path(path).resolve()
    for given in map(Path, inputs):
        if full == given.resolve() or given.resolve() in full.parents:
            what = "is the input" if full == given.resolve() else "lies inside the input"
            raise UserError(f"{flag} {path}: {what} {'folder' if given.is_dir() else 'file'} {given}, which it "
                            "would overwrite; write it elsewhere")
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{flag} {path}: is a {'file' if folder else 'folder'}, expected a "
                        f"{'folder' if folder else 'file name'}")
    above = full.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise UserError(f"{flag} {path}: lies under {above}, which is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {above} (read-only file system or no permission)")
    return path


@contextmanager
def run_lock(folder):
    """One run per output folder at a time: FOLDER/.lock names the live process (pid, host, start time);
    another run is refused naming it, and a lock whose process is gone (on this host) is taken over.
    Under torchrun the first process holds it for all."""
    if int(os.environ.get("RANK", 0)) != 0:
        yield
        return
    folder = Path(folder)
    made = [f for f in (folder, *folder.parents) if not f.exists()]  # removed again if the run leaves them empty
    folder.mkdir(parents=True, exist_ok=True)
    lock, me = folder / ".lock", f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            held = lock.read_text(errors="replace").strip()
            words = held.split()
            if len(words) < 4 or words[0] != "pid" or not words[1].isdigit() or words[3] != socket.gethostname() \
                    or pid_alive(int(words[1])):
                raise UserError(f"{folder} is in use by another run ({held[:200] or 'an empty lock'}, {lock}); wait "
                                f"for it to end, use another --out, or remove {lock} if that process is gone") from None
            lock.unlink(missing_ok=True)  # a stale lock: its process is gone
    os.write(fd, (me + "\n").encode())
    os.close(fd)
    try:
        yield
    finally:
        if lock.is_file() and lock.read_text(errors="replace").strip() == me:
            lock.unlink()
        for f in made:
            if any(f.iterdir()):
                break
            f.rmdir()


def write_json(path, obj):
    """obj as indented JSON, written atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")




# ----------------------------------------------------------------------------------------------
# Checks shared by the scripts that generate

def check_prompt(n_prompt, max_new_tokens, context):
    """A prompt of n_prompt tokens plus max_new_tokens must fit the model's context (max_position_embeddings)."""
    if n_prompt == 0:
        raise UserError("the prompt is empty")
    if n_prompt > context:
        raise UserError(f"the prompt is {n_prompt} tokens, longer than the model's context of {context} "
                        f"(max_position_embeddings)")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if n_prompt + max_new_tokens > context:
        raise UserError(f"the prompt ({n_prompt} tokens) plus --max-new-tokens {max_new_tokens} exceeds the "
                        f"model's context of {context} (max_position_embeddings)")


# ----------------------------------------------------------------------------------------------
# Flags into values: what argparse does not parse (one UserError naming the flag), and config dataclasses

def comma_numbers(text, kind, flag):
    """A comma-separated flag value as a list of non-negative `kind`."""
    try:
        values = [kind(x) for x in text.split(",")]
    except ValueError:
        values = [-1]
    if min(values) < 0:
        raise UserError(f"{flag} takes comma-separated numbers >= 0, got {text!r}")
    return values


def json_object(text, flag, keys, where, example):
    """A flag's JSON object (None: {}) whose keys are all among `keys` (named `where` in the error)."""
    try:
        value = {} if text is None else json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} is not valid JSON ({e.msg}); expected an object such as '{example}'") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise UserError(f"{flag} key {unknown[0]!r} is not a key of {where}")
    return value


def parse_routing(text, top_k):
    """A cache-aware routing rule (cache.steered) as train.py's --train-routing writes it: "bias:B" (a bonus B on
    cached experts' scores, model.Gate's bonus) or "keep:J:M" (the guaranteed rule: the true top-J, the other K - J
    preferring cached experts within M of the K-th best score) -> {"bias": B} or {"keep": J, "margin": M}."""
    kind, *values = text.split(":")
    try:
        if kind == "bias" and len(values) == 1 and float(values[0]) > 0:
            return {"bias": float(values[0])}
        if kind == "keep" and len(values) == 2 and 0 <= int(values[0]) < top_k and float(values[1]) > 0:
            return {"keep": int(values[0]), "margin": float(values[1])}
    except ValueError:
        pass
    raise UserError(f"--train-routing {text!r}: expected bias:B with B > 0, or keep:J:M with J in 0..{top_k - 1} "
                        f"(top-k {top_k}) and M > 0")


def config_from_flags(cls, args, **given):
    """A config dataclass whose fields come from the parsed flags of the same name, except those `given`
    (the flags' defaults are the dataclass's own, so each default is declared once)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)} | given)


# ----------------------------------------------------------------------------------------------
# Prompts in, text out: the generating scripts' ends

def prompt_token_ids(args, tok, vocab_size):
    """The prompt's token ids: --prompt-ids as given (checked against the vocabulary), else --prompt encoded."""
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise UserError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"--prompt-ids must be in 0..{vocab_size - 1}, got {bad[0]}")
        return ids
    if tok is None:
        raise UserError(f"{args.model}: no tokenizer.json to encode --prompt; pass --prompt-ids instead")
    return tok.encode(args.prompt).ids


class TextStream:
    """Prints generated text as it comes, holding back a token that ends inside a UTF-8 character."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], 0

    def __call__(self, token):
        self.ids.append(token)
        if self.tok is None:
            print(f" {token}", end="", flush=True)
            return
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[self.shown:], end="", flush=True)
            self.shown = len(text)
