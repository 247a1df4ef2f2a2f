"""
resume.py: resumable training, for pretraining (testbed.py) and ReMoE fine-tuning (train.py) alike.
A training loop saves its state atomically every few steps; a later run continues from it only when
its "key" (every setting that changes the result, by flag) equals the saved one, so that a resume
never mixes two runs. A resumed run ends bit for bit where an uninterrupted one does: the state
holds the trained tensors, the optimizer, the batch generator's RNG and how far the loop got.

Leaves out: elastic restarts (a different number of processes) and keeping several states.
"""

import hashlib
import io
import json
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from cli import UserError, atomic_write, remove_stale_temps

FIELDS = ("key", "progress", "tensors", "optimizer", "generator", "wall_seconds")  # what a state holds

# ----------------------------------------------------------------------------------------------
# The key: what a run was made of, short enough to print in an error


def digest(obj):
    """A short, stable hash of a JSON-able object: stands for a value too long to print in an error."""
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=8).hexdigest()


def corpus_identity(data, corpus):
    """What --data names, and a fingerprint of what was read there (so an edited corpus is not resumed)."""
    where = str(Path(data).resolve()) if data else "the default corpus"
    return f"{where} (corpus {corpus.fingerprint[:12]})"


def model_identity(model_dir, tensors):
    """A checkpoint as a resume sees it: its folder, and a digest of its config.json, tokenizer.json and
    `tensors` (the routers: another base model, even one pretrained with another seed, has other ones)."""
    h = hashlib.blake2b(digest_size=8)
    for name in ("config.json", "tokenizer.json"):
        f = Path(model_dir) / name
        h.update(f.read_bytes() if f.is_file() else b"")
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())  # the raw bytes, any dtype
    return f"{Path(model_dir).resolve()} ({h.hexdigest()})"


# ----------------------------------------------------------------------------------------------
# The state file


def save_state(path, state):
    """torch.save through cli.atomic_write: a kill mid-save leaves the previous state whole. Serialised in
    memory first (a state is small: routers, or the small testbed model), so that a failed write, say a full
    disk, is an OSError that names its cause (torch.save would report a RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_write(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_state(path, key, fresh=False):
    """The state saved at `path` by a run with the same `key`; None when there is none or when `fresh`
    (--no-resume). A state saved with another key is refused, naming each differing flag: resuming it
    would silently mix two runs."""
    remove_stale_temps(path)  # what a process killed mid-save left beside it
    if fresh or not path.is_file():
        return None
    try:
        with warnings.catch_warnings():  # a planted file's protocol warning: the error line below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True)  # tensors and plain values only: a pickle runs no code
    except Exception as e:  # torch.load raises many kinds on a damaged file
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e):  # a pickle of other objects: loading those could run code
            why = "it holds objects other than tensors and plain values, which are refused"
        raise UserError(f"{path}: unreadable training state ({why}); pass --no-resume to start over") from None
    if not isinstance(state, dict) or not isinstance(state.get("key"), dict) or not set(FIELDS) <= set(state):
        raise UserError(f"{path}: not a training state that this version of remoe wrote; "
                        "pass --no-resume to start over")
    saved = state["key"]
    differ = [f"{k}: {saved.get(k)!r} in the state, {key.get(k)!r} now" for k in {**key, **saved}
              if saved.get(k) != key.get(k)]
    if differ:
        raise UserError(f"{path} was saved by a run with other arguments ({'; '.join(differ)}); rerun with "
                        "the same arguments to resume it, or pass --no-resume to start over")
    return state


class TrainingState:
    """One run's resumable state at `path`. `resume` names what the loop trains (tensors by name, the
    optimizer, the generator that draws its batches) and loads a saved state into them; `save` writes
    them with the loop's progress; `seconds` counts the time of every process that worked on the run."""

    def __init__(self, path, key, *, fresh=False, started=None):
        self.path, self.key, self.fresh = Path(path), key, fresh
        self.started = time.perf_counter() if started is None else started  # when this process began
        self.earlier = 0.0  # seconds that earlier processes spent on the run, up to the state resumed
        self.finite = True  # all losses so far finite: a device-side flag, read only by `check`
        self.saved = None   # the progress of the last state saved or resumed

    def resume(self, tensors, optimizer, generator):
        """From now on `save` saves these; returns the progress of the saved state loaded into them, or None."""
        self.tensors, self.optimizer, self.generator = tensors, optimizer, generator
        state = load_state(self.path, self.key, self.fresh)
        if state is None:
            return None
        with torch.no_grad():
            for name, t in tensors.items():
                t.copy_(state["tensors"][name])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        self.earlier = state["wall_seconds"]
        self.saved = state["progress"]
        return self.saved

    def watch(self, *losses):
        """Note whether this step's losses are finite, on the device: no wait for it each step."""
        self.finite = torch.isfinite(torch.stack([x.detach().float() for x in losses])).all() & self.finite

    def check(self, **progress):
        """A loss or a trained tensor that became NaN or Inf stops the run (UserError) before anything is
        saved or written: the last good state stays as it is. Called every few steps and before each write."""
        tensors = [getattr(t, "_local_tensor", t) for t in self.tensors.values()]  # an FSDP shard: its own part
        if bool(self.finite) and all(bool(torch.isfinite(t).all()) for t in tensors):
            return
        at = ", ".join(f"{k} {v}" for k, v in progress.items() if k != "reports")
        kept = (f"the last good state ({', '.join(f'{k} {v}' for k, v in self.saved.items() if k != 'reports')}) "
                f"is kept in {self.path}" if self.saved is not None else "no state had been saved yet")
        raise UserError(f"training stopped: a loss or a trained tensor became NaN or Inf by {at}; nothing was "
                        f"written and {kept}; try a lower learning rate")

    def save(self, **progress):
        self.check(**progress)
        self.saved = progress
        save_state(self.path, {"key": self.key, "progress": progress,
                               "tensors": {name: t.detach().clone() for name, t in self.tensors.items()},
                               "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                               "wall_seconds": self.seconds()})

    def seconds(self):
        return self.earlier + time.perf_counter() - self.started

    def remove(self):
        """The finished model replaces the state."""
        self.path.unlink(missing_ok=True)


@contextmanager
def stop_on_interrupt():
    """Ctrl-C ends the program with one line that says how to resume, and status 130."""
    try:
        yield
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last saved state", file=sys.stderr)
        sys.exit(130)
