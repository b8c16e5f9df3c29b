"""Feed a whole book into StreamingMHLA at bounded memory, then ask for a summary.

    python examples/summarize_long_document.py ../shared/data/gutenberg/alices-adventures-in-wonderland.txt.xz

The text goes in chunk by chunk; the progress bar shows tokens/s, the process's resident memory
and the MHLA state size, which stay flat however long the book. Then a summary prompt is fed
and the model continues it. (The shipped default is a 17M-parameter story model: expect a
story-like continuation, not an abstractive summary; bring larger weights with --model.)
"""
from __future__ import annotations

import lzma
import resource
import sys
from pathlib import Path

import click
from tqdm import tqdm

from mhla_stream import DEFAULT_MODEL, StreamingMHLA


def read(path: Path) -> str:
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def rss_mib() -> float:
    try:  # current resident set size, from /proc (Linux)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@click.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", default=DEFAULT_MODEL)
@click.option("--device", default=None)
@click.option("--chars-per-chunk", default=20_000)
@click.option("--max-chars", default=0, help="read only this many characters (0 = all)")
@click.option("--prompt", default="\n\nIn short, this story is about", show_default=True)
@click.option("--max-new-tokens", default=80)
@click.option("--state-dtype", default="fp32", show_default=True,
              type=click.Choice(["fp32", "float32", "bf16", "bfloat16"]), help="storage of the completed block summaries (bf16: half the state memory)")
def main(path, model, device, chars_per_chunk, max_chars, prompt, max_new_tokens, state_dtype):
    text = read(path)
    if max_chars:
        text = text[:max_chars]
    stream = StreamingMHLA.from_pretrained(model, device=device, state_dtype=state_dtype)
    memory = []
    with tqdm(total=len(text), unit="char", unit_scale=True, desc=path.name, dynamic_ncols=True) as bar:
        for start in range(0, len(text), chars_per_chunk):
            stream.feed(text[start:start + chars_per_chunk])
            memory.append(rss_mib())
            bar.update(min(chars_per_chunk, len(text) - start))
            bar.set_postfix(tokens=stream.position, rss_MiB=f"{memory[-1]:.0f}", state_MiB=f"{stream.state_bytes / 2**20:.1f}")
    print(f"\nfed {stream.position:,} tokens; state {stream.state_bytes / 2**20:.2f} MiB (constant); "
          f"resident memory first/last chunk {memory[0]:.0f} / {memory[-1]:.0f} MiB")
    print(f"\n{prompt.strip()}", end="", flush=True)
    for piece in stream.stream(prompt, max_new_tokens=max_new_tokens, temperature=0.7, top_k=40, seed=0):
        print(piece, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
