"""Tests for data.py: split, batches, bad input, tokenizer, token cache and CLI.

Everything runs on small corpora in tmp folders; the default corpus is read and hashed, never tokenized.
The `tokenizers` library itself is the oracle for our encoding pipeline.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

import data
from data import (
    DEFAULT_CORPUS, SPLITS, Corpus, DataConfig, TokenData, chunk_text, default_corpus_files, documents_digest,
    eval_windows, load_corpus, prepare_data, random_batch, random_batches, require_windows, split_of, train_tokenizer,
)
from cli import UserError
from tiny import assert_cli_errors

ROOT = Path(__file__).resolve().parents[1]
SMALL_VOCAB = 400  # enough merges to be a real BPE, trains in milliseconds


def write_docs(folder: Path, n: int = 60) -> dict[str, str]:
    """n small text files in nested folders, with unicode, tabs and blank lines."""
    docs = {}
    for i in range(n):
        name = f"pkg{i % 3}/mod_{i:03d}.py"
        text = (f"def f_{i}(x):\n\t'''Return x * {i} (ünïcødé ✓, 中文).'''\n\n"
                f"    return x * {i}  # 🐍 line {i}\n" * (1 + i % 4))
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
        docs[name] = text
    return docs


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Split


def test_default_corpus_is_the_pinned_release_on_every_machine():
    """The default corpus is the same text everywhere: the pinned package's .py files, sorted, exactly as many
    as pinned, and their names and texts hash to the pinned fingerprint (recomputed here file by file)."""
    files = default_corpus_files()
    names = [name for name, _ in files]
    assert names == sorted(names) and len(names) == DEFAULT_CORPUS["files"]
    assert all(n.startswith(DEFAULT_CORPUS["package"] + "/") and n.endswith(".py") for n in names)
    texts = [(n, p.read_bytes().decode()) for n, p in files]
    assert documents_digest([(n, t) for n, t in texts if t.strip()]) == DEFAULT_CORPUS["fingerprint"]
    corpus = load_corpus(DataConfig())
    assert corpus.source == f"{DEFAULT_CORPUS['package']} {DEFAULT_CORPUS['version']} sources"
    assert sum(map(len, (corpus.train, corpus.val, corpus.test))) + corpus.skipped.get("empty", 0) == len(names)


def test_default_corpus_refuses_another_release_or_other_text(monkeypatch):
    """Another installed version, or files whose text differs from the pinned release, are one clear error
    naming the pinned release and how to get it, instead of a silently different testbed."""
    monkeypatch.setitem(DEFAULT_CORPUS, "version", "0.0.1")
    with pytest.raises(UserError, match="sources of sympy 0.0.1, but sympy .* is installed: pip install sympy==0.0.1"):
        load_corpus(DataConfig())
    monkeypatch.undo()
    monkeypatch.setitem(DEFAULT_CORPUS, "fingerprint", "0" * 32)
    with pytest.raises(UserError, match="not the pinned corpus .*pip install --force-reinstall sympy=="):
        load_corpus(DataConfig())


def test_default_corpus_split_is_deterministic_disjoint_and_near_90_5_5():
    cfg = DataConfig()
    names = [name for name, _ in default_corpus_files()]
    first = {n: split_of(n, cfg) for n in names}
    assert first == {n: split_of(n, cfg) for n in names}  # same split twice
    # a dict gives each file exactly one split; check every split is used in about its share
    shares = {s: sum(v == s for v in first.values()) / len(names) for s in SPLITS}
    assert abs(shares["train"] - 0.90) < 0.03 and all(0.02 < shares[s] < 0.08 for s in ("val", "test"))


def test_split_does_not_depend_on_python_hash_seed():
    names = [name for name, _ in default_corpus_files()][:200]
    code = "import sys, data; print([data.split_of(n, data.DataConfig()) for n in sys.argv[1:]])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([split_of(n, DataConfig()) for n in names])


def test_folder_corpus_puts_every_file_in_exactly_one_split(tmp_path):
    docs = write_docs(tmp_path)
    corpus = load_corpus(DataConfig(data=str(tmp_path)))
    names = [name for s in SPLITS for name, _ in getattr(corpus, s)]
    assert sorted(names) == sorted(docs) and len(set(names)) == len(names)
    for s in SPLITS:
        split_names = [name for name, _ in getattr(corpus, s)]
        assert split_names == sorted(split_names)  # deterministic document order
    assert all(text == docs[name] for s in SPLITS for name, text in getattr(corpus, s))
    assert load_corpus(DataConfig(data=str(tmp_path))).fingerprint == corpus.fingerprint


def test_single_file_is_chunked_into_documents_that_reassemble(tmp_path):
    text = "".join(f"paragraph {i}\nline two of {i}\n\n" for i in range(2000))
    assert "".join(chunk_text(text, 500)) == text
    assert "".join(chunk_text("no blank lines\n" * 1000, 100)) == "no blank lines\n" * 1000
    assert max(map(len, chunk_text("no blank lines\n" * 1000, 100))) <= 400 + 15
    (tmp_path / "book.txt").write_text(text)
    corpus = load_corpus(DataConfig(data=str(tmp_path / "book.txt"), chunk_chars=500))
    assert all(getattr(corpus, s) for s in SPLITS)  # enough pieces for all three splits
    pieces = sorted(corpus.train + corpus.val + corpus.test, key=lambda d: int(d[0].split("#")[1]))
    assert "".join(t for _, t in pieces) == text


# ----------------------------------------------------------------------------------------------
# Batches


def test_eval_windows_worked_by_hand():
    tokens = np.arange(20, dtype=np.uint16)
    expected = torch.tensor([list(range(0, 5)), list(range(6, 11)), list(range(12, 17))])
    assert torch.equal(eval_windows(tokens, seq_len=4, max_windows=3), expected)
    assert eval_windows(tokens, seq_len=4, max_windows=100).shape == (4, 5)  # only 4 fit


def test_eval_windows_are_fixed_and_do_not_overlap():
    tokens = np.arange(10_007, dtype=np.uint16)  # id == position, so a window's first id is its start
    a, b = eval_windows(tokens, 64, 50), eval_windows(tokens, 64, 50)
    assert a.shape == (50, 65) and a.dtype == torch.int64 and torch.equal(a, b)
    starts = a[:, 0].tolist()
    assert all(later - earlier >= 65 for earlier, later in zip(starts, starts[1:]))
    assert starts[-1] + 65 <= len(tokens) and starts[-1] > len(tokens) * 0.9  # spread over all of it


def test_random_batches_reproducible_and_shifted_by_one():
    tokens = np.arange(5000, dtype=np.uint16)  # consecutive ids: a window is a run of +1 steps
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, b = random_batch(tokens, 8, 32, g1), random_batch(tokens, 8, 32, g2)
    assert a.shape == (8, 33) and a.dtype == torch.int64 and torch.equal(a, b)
    x, y = a[:, :-1], a[:, 1:]
    assert torch.equal(y, x + 1)  # target is the input shifted by one position
    assert not torch.equal(a, random_batch(tokens, 8, 32, torch.Generator().manual_seed(8)))
    s1, s2 = random_batches(tokens, 4, 16, seed=3), random_batches(tokens, 4, 16, seed=3)
    assert all(torch.equal(next(s1), next(s2)) for _ in range(5))


def test_corpus_too_small_for_one_batch_is_a_data_error():
    with pytest.raises(UserError, match="fewer than one window"):
        random_batch(np.arange(10, dtype=np.uint16), 4, 64, torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="fewer than one window"):
        eval_windows(np.zeros(0, dtype=np.uint16), 64, 10)


def test_a_split_too_small_for_one_window_is_named_with_the_flag_to_change():
    ids = TokenData(train=np.zeros(100, dtype=np.uint16), val=np.zeros(0, dtype=np.uint16),
                    test=np.zeros(40, dtype=np.uint16), vocab_size=10, eot_id=0)
    require_windows(ids, ("train",), 32)
    with pytest.raises(UserError) as e:
        require_windows(ids, ("train", "val", "test"), 32)
    assert str(e.value).startswith("the val split has only 0 tokens") and "--seq-len" in str(e.value)
    with pytest.raises(UserError, match="the test split has only 40 tokens, fewer than one window of --seq-len"):
        require_windows(ids, ("test",), 40)


def test_tiny_corpus_end_to_end_raises_on_batch(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"text": f"hi {i}"}) + "\n" for i in range(40)))
    _, _, ids = prepare_data(DataConfig(data=str(path), vocab_size=SMALL_VOCAB), tmp_path / "out")
    with pytest.raises(UserError) as e:
        random_batch(ids.train, 4, 1024, torch.Generator().manual_seed(0))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# Bad input


def one_line_error(cfg: DataConfig) -> str:
    with pytest.raises(UserError) as e:
        load_corpus(cfg)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_path(tmp_path):
    assert "does not exist" in one_line_error(DataConfig(data=str(tmp_path / "nope")))


@pytest.mark.parametrize("bad_line, expected", [
    ("{not json", "not valid JSON"),
    ('{"body": "x"}', "expected an object with a 'text' key, got keys ['body']"),
    ('["text"]', "expected an object with a 'text' key, got list"),
    ('{"text": 3}', "'text' is int, expected a string"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, expected):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n\n' + bad_line + "\n")
    message = one_line_error(DataConfig(data=str(path)))
    assert message.startswith(f"{path}:3: ") and expected in message


def test_binary_and_empty_files_are_skipped_and_counted_non_utf8_bytes_replaced(tmp_path):
    docs = write_docs(tmp_path, n=30)
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    corpus = load_corpus(DataConfig(data=str(tmp_path)))
    assert corpus.skipped == {"binary": 1, "empty": 2} and corpus.repaired == 1
    texts = {n: t for s in SPLITS for n, t in getattr(corpus, s)}
    assert sorted(texts) == sorted([*docs, "latin1.txt"]) and texts["latin1.txt"] == "caf\ufffd cr\ufffdme"


def test_cache_folder_inside_the_corpus_is_refused(tmp_path):
    write_docs(tmp_path)
    with pytest.raises(UserError, match="inside --data"):
        prepare_data(DataConfig(data=str(tmp_path), vocab_size=SMALL_VOCAB), tmp_path / "runs" / "data")


def test_jsonl_with_byte_order_mark_and_blank_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "one"}\n\n{"text": "  "}\n{"text": "two"}\n')
    corpus = load_corpus(DataConfig(data=str(path), test_fraction=0.0, val_fraction=0.0))
    assert corpus.train == [("c.jsonl:1", "one"), ("c.jsonl:4", "two")] and corpus.skipped == {"empty": 1}


def test_glob_option_and_no_usable_text(tmp_path):
    write_docs(tmp_path, n=10)
    notes = [f"notes/{i}.md" for i in range(20)]
    for name in notes:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(f"# note {name}\n")
    corpus = load_corpus(DataConfig(data=str(tmp_path), glob="**/*.md"))
    assert sorted(n for s in SPLITS for n, _ in getattr(corpus, s)) == sorted(notes)
    assert "match --glob" in one_line_error(DataConfig(data=str(tmp_path), glob="*.rst"))
    (tmp_path / "only_binary").mkdir()
    (tmp_path / "only_binary" / "a.bin").write_bytes(b"\x00\x01")
    assert "binary=1" in one_line_error(DataConfig(data=str(tmp_path / "only_binary")))


# ----------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return train_tokenizer(list(write_docs(folder).values()), SMALL_VOCAB)


@pytest.mark.parametrize("text", [
    "def f(x):\n\treturn x  # done\n",
    "ünïcødé ✓ 中文 🐍 never seen: Ωμέγα ᚠᚢᚦ \U0001F600",
    "\t\ttabs\n\n\nnewlines\r\nand CRLF, trailing spaces   ",
    "",
])
def test_byte_level_bpe_round_trip_is_exact(small_tokenizer, text):
    ids = small_tokenizer.encode(text).ids
    assert small_tokenizer.decode(ids) == text
    assert max(ids, default=0) < small_tokenizer.get_vocab_size()


def test_end_of_text_is_one_special_token(small_tokenizer):
    eot = small_tokenizer.token_to_id(data.EOT)
    assert small_tokenizer.encode(data.EOT).ids == [eot]
    assert data.separator_id(small_tokenizer) == eot


def test_checkpoint_tokenizer_json_matches_the_library(tmp_path, small_tokenizer):
    """Our batched, cached pipeline gives exactly the ids of `Tokenizer.encode`, document by document."""
    write_docs(tmp_path / "corpus")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    small_tokenizer.save(str(checkpoint / "tokenizer.json"))
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": data.EOT}}))
    cfg = DataConfig(data=str(tmp_path / "corpus"))
    corpus, _, ids = prepare_data(cfg, tmp_path / "out", checkpoint=checkpoint)

    oracle = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    eot = oracle.token_to_id(data.EOT)
    for split in SPLITS:
        expected = [i for _, text in getattr(corpus, split) for i in oracle.encode(text).ids + [eot]]
        assert getattr(ids, split).dtype == np.uint16
        assert getattr(ids, split).tolist() == expected
    assert not (tmp_path / "out" / "tokenizer.json").exists()  # a checkpoint's tokenizer is not retrained


def test_checkpoint_errors(tmp_path, small_tokenizer):
    corpus = Corpus(train=[("a", "a")], val=[], test=[])
    with pytest.raises(UserError, match="tokenizer.json"):
        data.load_or_train_tokenizer(tmp_path / "out", corpus, SMALL_VOCAB, checkpoint=tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(UserError, match="'</s>'"):
        data.separator_id(small_tokenizer, tmp_path)


def test_id_dtype_widens_for_large_vocabularies():
    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)}, unk_token="w0"))
    assert data.id_dtype(big) == np.uint32


# ----------------------------------------------------------------------------------------------
# Token cache


def spy(monkeypatch, name: str, calls: list[str]) -> None:
    """Wrap data.<name> so that each call is recorded before the real function runs."""
    real = getattr(data, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(data, name, wrapper)


def test_second_call_reads_the_cache(tmp_path, monkeypatch):
    write_docs(tmp_path / "corpus")
    cfg, out = DataConfig(data=str(tmp_path / "corpus"), vocab_size=SMALL_VOCAB), tmp_path / "out"
    before = files_under(tmp_path)
    _, tok, first = prepare_data(cfg, out)
    new_files = files_under(tmp_path) - before
    assert new_files and all(out in p.parents for p in new_files)  # nothing written outside `out`
    assert not any(p.name.startswith(".") for p in new_files)  # no temporary file of an atomic write left
    assert isinstance(first.train, np.memmap) and tok.get_vocab_size() == SMALL_VOCAB

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(data, "encode_documents", must_not_run)
    monkeypatch.setattr(data, "train_tokenizer", must_not_run)
    _, _, second = prepare_data(cfg, out)
    for split in SPLITS:
        assert np.array_equal(getattr(first, split), getattr(second, split))
    assert files_under(tmp_path) == before | new_files

    # a changed corpus or vocab size is a new key: the tokenizer is retrained, the ids recomputed
    monkeypatch.undo()
    calls = []
    spy(monkeypatch, "encode_documents", calls)
    spy(monkeypatch, "train_tokenizer", calls)
    (tmp_path / "corpus" / "new.py").write_text("print('a new file')\n" * 50)
    prepare_data(cfg, out)
    assert sorted(calls) == ["encode_documents"] * 3 + ["train_tokenizer"]
    calls.clear()
    _, tok, _ = prepare_data(DataConfig(data=cfg.data, vocab_size=SMALL_VOCAB + 50), out)
    assert sorted(calls) == ["encode_documents"] * 3 + ["train_tokenizer"]
    assert tok.get_vocab_size() > SMALL_VOCAB  # the small corpus runs out of merges before 450


# ----------------------------------------------------------------------------------------------
# Command line


def test_cli_bad_input_is_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = {
        "missing --data": (["--data", str(tmp_path / "missing")], "does not exist"),
        "empty folder": (["--data", str(tmp_path / "empty")], "match --glob '**/*'; expected text files there"),
    }
    assert_cli_errors(ROOT / "data.py", cases, cwd=tmp_path, extra=["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_cli_prints_statistics(tmp_path, capsys):
    write_docs(tmp_path / "corpus")
    data.main(["--data", str(tmp_path / "corpus"), "--out", str(tmp_path / "out"),
               "--vocab-size", str(SMALL_VOCAB)])
    out = capsys.readouterr().out
    for word in ("skipped", "vocab    400", "train", "val", "test", "bytes/token", "time"):
        assert word in out
