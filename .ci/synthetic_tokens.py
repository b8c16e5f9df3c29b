"""Synthetic token files in prepare_data's layout, for throughput runs of mhla-train (no tokenizer).

    python3 .ci/synthetic_tokens.py OUT_DIR VOCAB

A noisy arithmetic sequence: learnable, so the loss falls and a run shows that training works.
"""
import json
import pathlib
import sys

import numpy as np

out, vocab = pathlib.Path(sys.argv[1]), int(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
(out / "info.json").write_text(json.dumps({"vocab_size": vocab, "synthetic": True}))
for name, n in (("stories", 400_000), ("books", 2_000_000), ("valid", 200_000)):
    ((np.arange(n) * 7 + rng.integers(0, 5, n)) % vocab).astype(np.uint16).tofile(out / f"{name}.bin")
