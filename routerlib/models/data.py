"""Real text available offline: CPython's documentation and standard library, tokenized.

The corpus is the reference documentation shipped with every CPython (`pydoc_data.topics`, the
text behind `help('topic')`) followed by the standard library's sources (docstrings and code:
each module's first PER_FILE_CAP bytes, modules in sorted path order, tests excluded), TOTAL_CAP
bytes in all. Every 20th document is validation, the rest training: a fixed split at document
boundaries. A byte-level BPE tokenizer (the `tokenizers` library, VOCAB_SIZE tokens) is trained
on the training split.

The standard library differs between Python versions, so the corpus is built once
(`python -m routerlib.models.data --build`) into the package's assets and read from there on
every machine: corpus.json.xz (the documents, with the Python version they came from),
tokenizer.json, and tokens.npz (the uint16 token ids of each split, documents joined by the
end-of-text token), so that training needs neither the build's Python nor `tokenizers`.
"""

from __future__ import annotations

import argparse
import functools
import json
import lzma
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ASSETS = Path(__file__).resolve().parent / "assets"
CORPUS_FILE, TOKENIZER_FILE, TOKENS_FILE = "corpus.json.xz", "tokenizer.json", "tokens.npz"
SOURCE = ("CPython's bundled documentation (pydoc_data.topics) and standard-library sources "
          "(Python {version})")
VOCAB_SIZE = 4096
EOT = "<|endoftext|>"
PER_FILE_CAP = 8_000  # bytes of each stdlib module (its docstring and first definitions)
TOTAL_CAP = 5_000_000  # bytes of text in all
VAL_EVERY = 20  # document i is validation when i % VAL_EVERY == VAL_EVERY // 2
_EXCLUDED = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__phello__"}


# -- building (once, on the maintainer's machine) ------------------------------------------------

def collect_documents() -> list[tuple[str, str]]:
    """(name, text) of the corpus documents in their fixed order, TOTAL_CAP bytes at most."""
    from pydoc_data.topics import topics

    docs = [(f"pydoc:{k}", topics[k]) for k in sorted(topics)]
    lib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if _EXCLUDED & set(rel.parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > PER_FILE_CAP:  # cut at a line end
            text = text[:text.rfind("\n", 0, PER_FILE_CAP) + 1]
        docs.append((f"stdlib:{rel.as_posix()}", text))
    out, total = [], 0
    for name, text in docs:
        if total + len(text) > TOTAL_CAP:
            break
        out.append((name, text))
        total += len(text)
    return out


def is_validation(i: int) -> bool:
    return i % VAL_EVERY == VAL_EVERY // 2


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer (tokenizers) trained on texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_split(tok, texts: list[str]) -> np.ndarray:
    """Token ids of texts joined by the end-of-text token, uint16."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.uint16)


def build(out_dir: Path = ASSETS) -> dict[str, int]:
    """Write corpus.json.xz, tokenizer.json and tokens.npz into out_dir; returns sizes."""
    docs = collect_documents()
    split = ["val" if is_validation(i) else "train" for i in range(len(docs))]
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"source": SOURCE.format(version=platform.python_version()),
            "python": platform.python_version(),
            "docs": [{"name": n, "split": s, "text": t} for (n, t), s in zip(docs, split)]}
    with lzma.open(out_dir / CORPUS_FILE, "wt", encoding="utf-8", preset=9) as f:
        json.dump(meta, f, ensure_ascii=False)
    train = [t for (_, t), s in zip(docs, split) if s == "train"]
    val = [t for (_, t), s in zip(docs, split) if s == "val"]
    tok = train_tokenizer(train)
    tok.save(str(out_dir / TOKENIZER_FILE))
    np.savez_compressed(out_dir / TOKENS_FILE, train=encode_split(tok, train),
                        val=encode_split(tok, val), vocab_size=np.int64(tok.get_vocab_size()))
    return {"docs": len(docs), "train_docs": len(train), "val_docs": len(val),
            "bytes": sum(len(t) for _, t in docs)}


# -- reading (every machine) ---------------------------------------------------------------------

@dataclass(frozen=True)
class TextCorpus:
    """Token ids of the two splits (uint16, documents joined by the end-of-text token)."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    source: str


@functools.lru_cache(maxsize=1)
def load_corpus() -> TextCorpus:
    """The committed corpus tokens (no tokenizer needed)."""
    with np.load(ASSETS / TOKENS_FILE) as z:
        train, val, vocab = z["train"], z["val"], int(z["vocab_size"])
    return TextCorpus(train=train, val=val, vocab_size=vocab, source=corpus_source())


@functools.lru_cache(maxsize=1)
def corpus_documents() -> dict:
    """The committed corpus text: {"source", "python", "docs": [{"name", "split", "text"}]}."""
    with lzma.open(ASSETS / CORPUS_FILE, "rt", encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=1)
def corpus_source() -> str:
    return corpus_documents()["source"]


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    """The committed tokenizer (needs the `tokenizers` package)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # pragma: no cover - tokenizers is in the environment
        raise ImportError("decoding token ids needs the `tokenizers` package "
                          "(pip install tokenizers)") from e
    return Tokenizer.from_file(str(ASSETS / TOKENIZER_FILE))


def token_pieces(ids: np.ndarray | list[int]) -> list[str]:
    """The text of each token id on its own (a piece of a multi-byte character decodes to the
    replacement character)."""
    tok = load_tokenizer()
    return [tok.decode([int(i)], skip_special_tokens=False) for i in ids]


class BatchSampler:
    """Random windows of seq_len + 1 tokens from a token stream, reproducible from the seed:
    each batch is (x, y) with x = window[:-1], y = window[1:], both [B, S] long."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        if tokens.ndim != 1 or len(tokens) < seq_len + 2:
            raise ValueError(f"need a 1-D token stream longer than seq_len + 1 = {seq_len + 1}, "
                             f"got shape {tokens.shape}")
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.batch_size, self.seq_len = batch_size, seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,),
                               generator=self.gen)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)  # [B, S+1]
        w = self.tokens[idx]
        return w[:, :-1], w[:, 1:]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows from the start of the stream: the same every call."""
    t = torch.from_numpy(tokens.astype(np.int64))
    n = min(max_batches * batch_size, (len(t) - 1) // seq_len)
    if n < 1:
        raise ValueError(f"the stream of {len(t)} tokens holds no window of {seq_len + 1}")
    x = t[:n * seq_len].view(n, seq_len)
    y = t[1:n * seq_len + 1].view(n, seq_len)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", action="store_true", help="rebuild the assets from this Python")
    args = p.parse_args(argv)
    if args.build:
        print(build())
    c = load_corpus()
    print(f"{c.source}: {len(c.train)} train / {len(c.val)} validation tokens, "
          f"vocabulary {c.vocab_size}")


if __name__ == "__main__":
    main()
