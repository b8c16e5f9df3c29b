"""The shipped default model: held-out quality and agreement of the backends."""
import os

import pytest
import torch

from mhla_stream import DEFAULT_MODEL, MHLAForCausalLM, StreamingMHLA
from mhla_stream.hub import resolve_model
from mhla_stream.tokenizer import Tokenizer

# Measured 2.220 nats/token (CPU, fp32 weights from the fp16 file, 2026-11-22); the margin absorbs
# platform differences, not regressions.
VALID50_MAX_LOSS = 2.30


def test_shipped_model_loss_on_held_out_stories(shared_dir):
    path = resolve_model(DEFAULT_MODEL)
    model, tok = MHLAForCausalLM.from_pretrained(path), Tokenizer.from_directory(path)
    with open(os.path.join(shared_dir, "tinystories", "tinystories_valid_first50.txt"), encoding="utf-8") as f:
        stories = [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()]
    total, count = 0.0, 0
    with torch.no_grad():
        for story in stories:
            ids = torch.tensor([[tok.bos_id] + tok.encode(story) + [tok.eos_id]])
            logits = model(ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert count > 8000
    assert total / count < VALID50_MAX_LOSS, total / count


def test_shipped_model_size_and_files():
    path = resolve_model(DEFAULT_MODEL)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 40 * 2**20
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {f.name for f in path.iterdir()}


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_greedy_output_is_the_same_on_every_backend(backend):
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    prompt = "Once upon a time, there was a little red bird"
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # numba runs on the CPU
    ref = StreamingMHLA.from_pretrained(device=device, backend="torch").generate(prompt, max_new_tokens=20,
                                                                                 do_sample=False)
    other = StreamingMHLA.from_pretrained(device=device, backend=backend).generate(prompt, max_new_tokens=20,
                                                                                   do_sample=False)
    assert ref and other == ref
