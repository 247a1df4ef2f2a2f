"""data.py: from a text corpus to the token windows a language model trains and evaluates on.

Top to bottom: read a corpus (by default the Python sources of one pinned SymPy release) and split it *by
document* with a stable hash, so no file is in two splits; train a byte-level BPE tokenizer on the
train split (GPT-2's scheme: every byte is a token to start with, so any string round-trips), or use a
checkpoint's tokenizer.json; tokenize each split once into ids cached on disk as a numpy memmap (as
nanoGPT's prepare.py); cut random training batches and fixed, evenly spaced evaluation windows.
Leaves out corpora larger than memory, masks at document boundaries and deduplication.

    python data.py                                    # the default corpus, on the CPU
    python data.py --data notes/ --glob "**/*.md" --out runs/notes/data
    python data.py --data corpus.jsonl --vocab-size 4096 --out runs/jsonl/data

Shapes: B batch, T sequence length (a window holds T + 1 ids: input [:, :-1], target [:, 1:]), N windows.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from cli import ArgumentParser, UserError, atomic_write, fatal_errors, user_errors

EOT = "<|endoftext|>"  # document separator, GPT-2's name for it
SPLITS = ("train", "val", "test")
Document = tuple[str, str]  # (name, text)
ENCODE_BATCH_DOCS = 256  # documents per encode_batch call: big enough to keep all cores busy


@dataclass
class DataConfig:
    data: str | None = None  # None: the default corpus (DEFAULT_CORPUS); else a text file, folder or .jsonl
    glob: str = "**/*"  # which files of a --data folder to read
    vocab_size: int = 2048  # BPE vocabulary when we train the tokenizer ourselves (the default base model's)
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    chunk_chars: int = 2000  # a single --data file is cut into documents of about this size


# ----------------------------------------------------------------------------------------------
# Reading and splitting a corpus


@dataclass
class Corpus:
    train: list[Document]
    val: list[Document]
    test: list[Document]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> number of files or lines
    repaired: int = 0  # files kept with their bytes that are not UTF-8 read as U+FFFD
    source: str = "default"

    @cached_property
    def fingerprint(self) -> str:
        """Hash of every split's names and texts: the key of everything derived from the corpus."""
        h = hashlib.blake2b(digest_size=16)
        for split in SPLITS:
            for name, text in getattr(self, split):
                h.update(f"{split}\0{name}\0".encode())
                h.update(text.encode())
        return h.hexdigest()


def split_of(name: str, cfg: DataConfig) -> str:
    """Which split a document belongs to, from a stable hash of its name alone.

    Python's `hash` is salted per process, so we use blake2b: the same name lands in the same
    split on every run and machine, and adding a file never moves the others.
    """
    u = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") / 2**64
    if u < cfg.test_fraction:
        return "test"
    return "val" if u < cfg.test_fraction + cfg.val_fraction else "train"


# The default corpus: the Python sources of one pinned SymPy release. Its wheel is pure Python, so the
# text is the same bytes on every machine (the standard library is not: installs ship different files),
# requirements.txt pins it (torch needs SymPy too), and its fingerprint is checked every time it is read.
DEFAULT_CORPUS = {"package": "sympy", "version": "1.14.0", "files": 1532,
                  "fingerprint": "2943d0b164bf2d14227276e3ff18d753"}


def default_corpus_files() -> list[tuple[str, Path]]:
    """The pinned package's *.py files as sorted (path inside the wheel, path on disk)."""
    name, version = DEFAULT_CORPUS["package"], DEFAULT_CORPUS["version"]
    hint = f"pip install {name}=={version} (requirements.txt pins it), or pass --data"
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"the default corpus is the sources of {name} {version}, which is not installed: {hint}") from None
    if dist.version != version:
        raise UserError(f"the default corpus is the sources of {name} {version}, but {name} {dist.version} is "
                        f"installed: {hint}")
    return sorted((str(f), Path(f.locate())) for f in dist.files or ()
                  if str(f).startswith(f"{name}/") and str(f).endswith(".py"))


def documents_digest(docs: list[Document]) -> str:
    """Hash of the documents' names and texts, whatever their split."""
    h = hashlib.blake2b(digest_size=16)
    for name, text in sorted(docs):
        h.update(f"{name}\0".encode())
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()


def read_text(path: Path) -> tuple[str | None, str | None]:
    """(text, None) for a usable text file, else (None, why it was skipped). Bytes that are not UTF-8
    become U+FFFD: one stray byte does not cost the whole file (why: "repaired", the text kept)."""
    try:
        raw = path.read_bytes()
    except OSError:  # permission denied, a broken link, a file removed while we read
        return None, "unreadable"
    if b"\0" in raw:  # text encodings used in practice never contain NUL bytes; binaries do
        return None, "binary"
    try:
        text, why = raw.decode("utf-8"), None
    except UnicodeDecodeError:
        text, why = raw.decode("utf-8", errors="replace"), "repaired"
    return (text, why) if text.strip() else (None, "empty")


def read_jsonl(path: Path, skipped: dict[str, int]) -> list[Document]:
    """One document per line from its 'text' field; a malformed line stops us with its number."""
    docs = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 (byte {e.start}); expected UTF-8 JSON lines")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one object per line")
        except RecursionError:
            raise UserError(f"{path}:{lineno}: JSON nested too deeply to read; expected one flat object per line") from None
        if not isinstance(record, dict) or "text" not in record:
            got = f"keys {sorted(record)}" if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{path}:{lineno}: expected an object with a 'text' key, got {got}")
        if not isinstance(record["text"], str):
            got = type(record["text"]).__name__
            raise UserError(f"{path}:{lineno}: 'text' is {got}, expected a string")
        try:
            record["text"].encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's \ud800 escape: a lone surrogate is no character
            raise UserError(f"{path}:{lineno}: 'text' holds a lone surrogate ({e.object[e.start]!r} at character "
                            f"{e.start}); expected valid Unicode text") from None
        if record["text"].strip():
            docs.append((f"{path.name}:{lineno}", record["text"]))
        else:
            skipped["empty"] = skipped.get("empty", 0) + 1
    return docs


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Cut one long text into pieces at blank lines once a piece holds `chunk_chars` characters.

    A text without blank lines is cut at any line break once a piece is 4x too long. The pieces
    concatenate back to the text exactly.
    """
    pieces, lines, size = [], [], 0
    for line in text.splitlines(keepends=True):
        lines.append(line)
        size += len(line)
        if size >= chunk_chars and (not line.strip() or size >= 4 * chunk_chars):
            pieces.append("".join(lines))
            lines, size = [], 0
    return pieces + (["".join(lines)] if lines else [])


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the documents of `cfg.data` (default: the pinned corpus), skipping unusable files, and split them."""
    skipped: dict[str, int] = {}
    docs: list[Document] = []
    repaired = 0  # files with bytes that are not UTF-8

    def add_files(named_paths: list[tuple[str, Path]]) -> None:
        nonlocal repaired
        # disable=None: the bar shows on a terminal and stays out of logs and tests.
        for name, path in tqdm(named_paths, "reading", unit="file", file=sys.stderr, disable=None):
            text, why = read_text(path)
            if why and text is None:
                skipped[why] = skipped.get(why, 0) + 1
            else:
                docs.append((name, text))
                repaired += why == "repaired"

    if cfg.data is None:
        files = default_corpus_files()
        source = f"{DEFAULT_CORPUS['package']} {DEFAULT_CORPUS['version']} sources"
        add_files(files)
        digest = documents_digest(docs)
        if len(files) != DEFAULT_CORPUS["files"] or digest != DEFAULT_CORPUS["fingerprint"]:
            raise UserError(f"the installed {source} are not the pinned corpus ({len(files)} files, fingerprint "
                            f"{digest[:12]}; expected {DEFAULT_CORPUS['files']}, {DEFAULT_CORPUS['fingerprint'][:12]}): "
                            f"pip install --force-reinstall {DEFAULT_CORPUS['package']}=={DEFAULT_CORPUS['version']}")
    else:
        root = Path(cfg.data)
        source = str(root)
        if not root.exists():
            raise UserError(f"--data path '{root}' does not exist; "
                            "expected a text file, a folder or a .jsonl file")
        if root.is_dir():
            if Path(cfg.glob).is_absolute() or ".." in Path(cfg.glob).parts:
                raise UserError(f"--glob '{cfg.glob}' reaches outside --data '{root}'; expected a pattern "
                                "relative to it, without '..'")
            files = [(p.relative_to(root).as_posix(), p) for p in root.glob(cfg.glob) if p.is_file()]
            if not files:
                raise UserError(f"no files under '{root}' match --glob '{cfg.glob}'; "
                                "expected text files there, or another --glob")
            add_files(sorted(files))
        elif root.suffix == ".jsonl":
            docs = read_jsonl(root, skipped)
        else:  # one file: cut it into documents so that it can still be split three ways
            add_files([(root.name, root)])
            docs = [(f"{name}#{i}", piece) for name, text in docs
                    for i, piece in enumerate(chunk_text(text, cfg.chunk_chars))]

    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for name, text in docs:
        splits[split_of(name, cfg)].append((name, text))
    if not splits["train"]:
        why = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
        raise UserError(f"no usable text for the train split in '{source}' "
                        f"({len(docs)} documents, skipped: {why}); expected more text")
    if repaired:
        print(f"note: {repaired} file(s) of '{source}' hold bytes that are not UTF-8, read as U+FFFD",
              file=sys.stderr)
    return Corpus(**splits, skipped=skipped, repaired=repaired, source=source)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: the 256 byte symbols plus merges learned from `texts`, plus EOT.

    It trains in seconds on the default corpus's whole train split (it is multithreaded), so no subset.
    """
    tok = Tokenizer(models.BPE())
    # Why byte-level: text becomes bytes before merging and back after, so decode(encode(s)) == s
    # for any string. use_regex keeps GPT-2's split into words, numbers and punctuation runs.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def load_or_train_tokenizer(
    folder: Path, corpus: Corpus, vocab_size: int, checkpoint: Path | None = None
) -> Tokenizer:
    """A checkpoint's `tokenizer.json` if given; else ours, trained once per corpus and vocab size.

    Ours is saved as `folder/tokenizer.json`; `tokenizer.key` beside it records what it was
    trained on, so a changed corpus or vocab size retrains instead of reusing a stale one.
    """
    if checkpoint is not None:
        path = Path(checkpoint) / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"'{path}' not found; expected the checkpoint to ship tokenizer.json")
        return Tokenizer.from_file(str(path))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path, key_path = folder / "tokenizer.json", folder / "tokenizer.key"
    key = f"corpus={corpus.fingerprint} vocab_size={vocab_size}"
    if path.is_file() and key_path.is_file() and key_path.read_text() == key:
        return Tokenizer.from_file(str(path))
    tok = train_tokenizer([text for _, text in corpus.train], vocab_size)
    # cli.atomic_write: a crash or Ctrl-C mid-write never leaves a half-written file to be trusted
    with atomic_write(path) as tmp:
        tmp.write_text(tok.to_str(), encoding="utf-8")
    with atomic_write(key_path) as tmp:  # written last: it vouches for a complete tokenizer.json
        tmp.write_text(key, encoding="utf-8")
    return tok


def separator_id(tok: Tokenizer, checkpoint: Path | None = None) -> int:
    """Id of the document separator: EOT, or `eos_token` from a checkpoint's tokenizer_config.json."""
    name = EOT
    config = Path(checkpoint) / "tokenizer_config.json" if checkpoint is not None else None
    if config is not None and config.is_file():
        eos = json.loads(config.read_text()).get("eos_token") or EOT
        name = eos["content"] if isinstance(eos, dict) else eos
    token_id = tok.token_to_id(name)
    if token_id is None:
        raise UserError(f"tokenizer has no token {name!r}; expected it as the document separator")
    return token_id


# ----------------------------------------------------------------------------------------------
# Token ids, cached on disk


def id_dtype(tok: Tokenizer) -> type:
    # Half the disk and page cache of uint32 whenever every id fits in 16 bits.
    return np.uint16 if tok.get_vocab_size(with_added_tokens=True) < 2**16 else np.uint32


def encode_documents(tok: Tokenizer, texts: list[str], eot_id: int, f: BinaryIO) -> int:
    """Write the ids of each text, each followed by `eot_id`, to `f`; return how many."""
    dtype, n = id_dtype(tok), 0
    starts = range(0, len(texts), ENCODE_BATCH_DOCS)
    for i in tqdm(starts, desc="tokenizing", unit="batch", file=sys.stderr, disable=None):
        # encode_batch_fast: multithreaded, and skips the character offsets we do not need.
        # add_special_tokens=False: a checkpoint's post-processor would add BOS to every text.
        for enc in tok.encode_batch_fast(texts[i : i + ENCODE_BATCH_DOCS], add_special_tokens=False):
            ids = np.array(enc.ids + [eot_id], dtype=dtype)
            ids.tofile(f)
            n += len(ids)
    return n


def token_ids(corpus: Corpus, split: str, tok: Tokenizer, *, eot_id: int, folder: Path) -> np.ndarray:
    """All ids of one split as a read-only memmap, tokenized on the first call only.

    The cache file is named by a hash of (corpus fingerprint, split, tokenizer, separator), so a
    change to any of them makes a new file instead of reading stale ids.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = id_dtype(tok)
    tok_hash = hashlib.blake2b(tok.to_str().encode()).hexdigest()
    key = hashlib.blake2b(f"{corpus.fingerprint}|{split}|{tok_hash}|{eot_id}".encode(), digest_size=8)
    path = folder / f"{split}-{key.hexdigest()}.{np.dtype(dtype).name}.bin"
    count = path.with_name(path.name + ".count")  # its number of ids, written after it: a cut file shows
    n = int(count.read_text()) if count.is_file() and count.read_text().isdigit() else None
    size = path.stat().st_size if path.is_file() else None
    if size is None or n is None or size != n * np.dtype(dtype).itemsize:
        if size is not None and n is not None:
            print(f"note: the token cache {path} is damaged ({size} bytes, expected {n * np.dtype(dtype).itemsize}); "
                  "tokenizing again", file=sys.stderr)
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            n = encode_documents(tok, [text for _, text in getattr(corpus, split)], eot_id, f)
        with atomic_write(count) as tmp:
            tmp.write_text(str(n))
    if path.stat().st_size == 0:  # an empty split; mmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    vocab_size: int
    eot_id: int


def prepare_data(
    cfg: DataConfig, folder: Path, checkpoint: Path | None = None
) -> tuple[Corpus, Tokenizer, TokenData]:
    """Corpus, tokenizer and cached ids of every split: the one call a training script needs."""
    out = Path(folder).resolve()
    if cfg.data is not None and Path(cfg.data).resolve() in (out, *out.parents):
        # else the next run would read our own tokenizer.json as training text and retrain
        raise UserError(f"cache folder '{folder}' is inside --data '{cfg.data}'; expected it outside")
    corpus = load_corpus(cfg)
    tok = load_or_train_tokenizer(folder, corpus, cfg.vocab_size, checkpoint)
    eot_id = separator_id(tok, checkpoint)
    ids = {s: token_ids(corpus, s, tok, eot_id=eot_id, folder=folder) for s in SPLITS}
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    return corpus, tok, TokenData(**ids, vocab_size=vocab_size, eot_id=eot_id)


# ----------------------------------------------------------------------------------------------
# Batches


def _check_window(tokens: np.ndarray, seq_len: int, what: str = "the token array") -> None:
    if len(tokens) < seq_len + 1:
        raise UserError(
            f"{what} has only {len(tokens)} tokens, fewer than one window of --seq-len + 1 = {seq_len + 1}; "
            "expected more text in --data or a smaller --seq-len"
        )


def require_windows(data: TokenData, splits: tuple[str, ...], seq_len: int) -> None:
    """Stop before any work when a split that a run reads cannot fill one window of T + 1 ids,
    naming the split (with a small --data, val or test may hold a handful of documents)."""
    for split in splits:
        _check_window(getattr(data, split), seq_len, f"the {split} split")


def random_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """B windows of T + 1 ids starting at random offsets: input = [:, :-1], target = [:, 1:]."""
    _check_window(tokens, seq_len)
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator).numpy()
    index = starts[:, None] + np.arange(seq_len + 1)  # (B, T+1)
    return torch.from_numpy(tokens[index].astype(np.int64))  # (B, T+1)


def random_batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> Iterator[torch.Tensor]:
    """An endless stream of `random_batch`es; the same seed gives the same stream."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield random_batch(tokens, batch_size, seq_len, generator)


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> torch.Tensor:
    """N = min(max_windows, len // (T+1)) evenly spaced, non-overlapping windows, fixed across runs.

    Worked by hand: 20 tokens, seq_len 4, max_windows 3 -> stride 20 // 3 = 6, starts 0, 6, 12,
    windows [0..4], [6..10], [12..16].
    """
    _check_window(tokens, seq_len)
    n = min(max_windows, len(tokens) // (seq_len + 1))
    # stride = len // n >= T+1 because n <= len // (T+1), so windows never overlap.
    starts = np.arange(n) * (len(tokens) // n)
    index = starts[:, None] + np.arange(seq_len + 1)  # (N, T+1)
    return torch.from_numpy(tokens[index].astype(np.int64))  # (N, T+1)


# ----------------------------------------------------------------------------------------------
# Command line: corpus statistics


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description="Read, split and tokenize a corpus; print its statistics.")
    g = p.add_argument_group("corpus")
    g.add_argument("--data", default=DataConfig.data,
                   help="text file, folder or .jsonl with a 'text' field (default: the pinned default corpus, DEFAULT_CORPUS)")
    g.add_argument("--glob", default=DataConfig.glob,
                   help="which files of a --data folder to read (default: %(default)s)")
    g = p.add_argument_group("tokenizer and cache")
    g.add_argument("--out", default="runs/default/data",
                   help="folder for tokenizer.json and the cached ids (default: %(default)s)")
    g.add_argument("--vocab-size", type=int, default=DataConfig.vocab_size,
                   help="vocabulary of the BPE we train (default: %(default)s)")
    g.add_argument("--tokenizer", default=None,
                   help="checkpoint folder whose tokenizer.json to use instead (default: train one)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    cfg = DataConfig(data=args.data, glob=args.glob, vocab_size=args.vocab_size)
    with user_errors(), fatal_errors():
        checkpoint = Path(args.tokenizer) if args.tokenizer else None
        corpus, tok, data = prepare_data(cfg, Path(args.out), checkpoint)

    print(f"corpus   {corpus.source}  (fingerprint {corpus.fingerprint[:12]})")
    print(f"skipped  {dict(sorted(corpus.skipped.items())) or 'nothing'}")
    print(f"vocab    {data.vocab_size}  separator id {data.eot_id}  {data.train.dtype} ids in {args.out}")
    print(f"{'split':<6} {'docs':>7} {'bytes':>12} {'tokens':>11} {'bytes/token':>12}")
    total_bytes = total_tokens = 0
    for split in SPLITS:
        n_bytes = sum(len(text.encode()) for _, text in getattr(corpus, split))
        n_tokens = len(getattr(data, split))
        total_bytes, total_tokens = total_bytes + n_bytes, total_tokens + n_tokens
        n_docs = len(getattr(corpus, split))
        print(f"{split:<6} {n_docs:>7} {n_bytes:>12,} {n_tokens:>11,} {n_bytes / max(n_tokens, 1):>12.2f}")
    ratio = total_bytes / max(total_tokens, 1)
    print(f"{'all':<6} {'':>7} {total_bytes:>12,} {total_tokens:>11,} {ratio:>12.2f}")
    print(f"time     {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
