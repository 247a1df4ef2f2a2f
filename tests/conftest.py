"""Shared pytest fixtures: tiny checkpoints built once per session, and model.py's models loaded
from them once per session, so that the parametrized tests stay fast on a 2-core CPU.

model.py is imported lazily inside the fixtures, so that a test file that does not need it
still collects while model.py is being written.
"""

import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
for _p in (REPO_ROOT, TESTS_DIR):  # `import model` and `import tiny` under plain `pytest` too
    if _p not in sys.path:
        sys.path.insert(0, _p)

from tiny import SMALL_RUN, VARIANTS, make_checkpoint  # noqa: E402


def pytest_configure(config):
    """One torch thread: the tiny models gain nothing from two, and on a shared machine two threads
    spin-wait on each other (measured 30x slower under load). Keep the log readable too:
    transformers' progress bars and config warnings are noise here."""
    import torch

    torch.set_num_threads(1)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Factory `tiny(variant_id) -> (hf_model, path)`: the transformers oracle and its saved
    checkpoint, built on first use and reused by every test of the session."""
    cache = {}

    def get(variant_id):
        if variant_id not in cache:
            arch, overrides = VARIANTS[variant_id]
            path = tmp_path_factory.mktemp(variant_id)
            cache[variant_id] = make_checkpoint(path, arch, **overrides)
        return cache[variant_id]

    return get


@pytest.fixture(scope="session")
def loaded(tiny):
    """Factory `loaded(variant_id) -> model`: model.py's `load_model` on the tiny checkpoint,
    float32 on CPU, loaded once per session."""
    cache = {}

    def get(variant_id):
        if variant_id not in cache:
            import checkpoint

            net = checkpoint.load_model(tiny(variant_id)[1])
            net.eval()
            cache[variant_id] = net
        return cache[variant_id]

    return get


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A few files of the default corpus (the pinned SymPy release, the same on every machine): enough text
    for a small BPE and a few batches, quick to tokenise."""
    import data

    files = dict(data.default_corpus_files())
    names = ("utilities/iterables.py", "utilities/misc.py", "core/containers.py", "core/singleton.py",
             "core/decorators.py", "ntheory/primetest.py", "printing/str.py", "series/order.py",
             "polys/orderings.py", "strategies/core.py", "unify/core.py", "core/cache.py")
    # one text file: data.py cuts it into ~2,000-character documents, which the hash splits three ways
    f = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    f.write_text("\n\n".join(files["sympy/" + n].read_text(encoding="utf-8") for n in names))
    return f


@pytest.fixture(scope="session")
def base_run(corpus, tmp_path_factory):
    """The small base model built by `python train.py --base-only`, once per session, in OUT/base."""
    out = tmp_path_factory.mktemp("run")
    import train

    train.main(["--base-only", "--data", str(corpus), "--out", str(out), *SMALL_RUN])
    return out
