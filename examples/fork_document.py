"""Read a document once, then answer two prompts from the same state (snapshot / restore).

    python examples/fork_document.py ../shared/data/tinystories/tinystories_valid_first50.txt
"""
from __future__ import annotations

import sys
from pathlib import Path

from mhla_stream import StreamingMHLA


def main(path: str, max_chars: int = 6000) -> None:
    stream = StreamingMHLA.from_pretrained()
    stream.feed(Path(path).read_text(encoding="utf-8")[:max_chars])
    print(f"document: {stream.position} tokens, state {stream.state_bytes / 2**20:.2f} MiB")
    snap = stream.snapshot()  # the document's state, taken once
    for prompt in ("\nOnce upon a time, a brave little", "\nThe next morning, the children"):
        stream.restore(snap)  # every branch starts from the same document state
        reply = stream.generate(prompt, max_new_tokens=50, temperature=0.7, top_k=40, seed=0)
        print(f"\n--- {prompt.strip()}{reply}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/tinystories/tinystories_valid_first50.txt")
