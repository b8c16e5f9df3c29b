"""Tokenizer and token files for training, from the text in ``shared/data`` (see its PROVENANCE.md).

    python -m mhla_stream.cli.prepare_data --shared ../shared/data --out runs/data

Writes ``tokenizer.model`` (SentencePiece BPE, byte fallback, bos 1 / eos 2), and uint16 token
files: ``stories.bin`` (TinyStories pool), ``books.bin`` (Gutenberg, minus the held-out books),
``valid.bin`` (TinyStories validation head), ``heldout_books.bin`` (long held-out text).
"""
from __future__ import annotations

import io
import json
import lzma
import random
from pathlib import Path

import click
import numpy as np

HELDOUT_BOOKS = ("moby_dick_pg2701", "pride_and_prejudice_pg1342", "dracula_pg345")


def read_text(path: Path) -> str:
    if path.suffix == ".xz":
        with lzma.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def stories(text: str) -> list[str]:
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()]


def train_tokenizer(samples: list[str], vocab_size: int) -> bytes:
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(samples), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=0.9995, split_digits=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, max_sentence_length=8192, num_threads=2,
                                   input_sentence_size=400_000, shuffle_input_sentence=True, minloglevel=2)
    return buf.getvalue()


@click.command()
@click.option("--shared", "shared", default="../shared/data", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default="runs/data", type=click.Path(file_okay=False))
@click.option("--vocab-size", default=8192)
def main(shared, out, vocab_size):
    import sentencepiece as spm
    shared, out = Path(shared), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pool = stories(read_text(shared / "tinystories" / "tinystories_train_pool.txt.xz"))
    books = {p.name.split(".")[0]: read_text(p) for p in sorted((shared / "gutenberg").glob("*.txt.xz"))}
    train_books = {k: v for k, v in books.items() if k not in HELDOUT_BOOKS}
    # tokenizer: stories plus paragraphs sampled from the training books
    rng = random.Random(0)
    paras = [p for b in train_books.values() for p in b.split("\n\n") if len(p) > 40]
    rng.shuffle(paras)
    click.echo(f"training tokenizer on {len(pool)} stories + {min(len(paras), 150_000)} book paragraphs")
    (out / "tokenizer.model").write_bytes(train_tokenizer(pool + paras[:150_000], vocab_size))
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))

    def encode_docs(docs):  # each document: bos + text + eos
        ids = []
        for d in docs:
            ids += [1] + sp.encode(d) + [2]
        return np.asarray(ids, dtype=np.uint16)

    parts = {"stories": pool, "books": list(train_books.values()),
             "valid": [read_text(shared / "tinystories" / "tinystories_valid_head.txt.xz")],
             "valid50": stories(read_text(shared / "tinystories" / "tinystories_valid_first50.txt")),
             "heldout_books": [books[k] for k in HELDOUT_BOOKS if k in books]}
    info = {"vocab_size": vocab_size, "heldout_books": list(HELDOUT_BOOKS)}
    for name, docs in parts.items():
        arr = encode_docs(docs)
        arr.tofile(out / f"{name}.bin")
        info[name] = {"docs": len(docs), "tokens": int(arr.size)}
        click.echo(f"{name}: {len(docs)} docs, {arr.size:,} tokens")
    (out / "info.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
