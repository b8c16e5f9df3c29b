import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter (read when the kernels are first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = os.environ.get("MHLA_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def rand_qkv(B, T, H, K, V, L, *, dtype=torch.float32, seed=0, device="cpu"):
    """Non-negative q, k (as after relu) and signed v; a raw mixing matrix with entries outside [1e-5, 1]
    so the clamp is exercised."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, T, H, K, generator=g)
    k = torch.rand(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    m = torch.rand(L, L, generator=g) * 1.2 - 0.1
    return (*(x.to(device=device, dtype=dtype) for x in (q, k, v)), m.to(device))


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def calls(q, k, v, m, cuts, backend, C, policy, state=None):
    """The operator over consecutive calls of ``cuts`` tokens each, the state carried (from ``state``,
    else a new one): the outputs concatenated, and the final state."""
    from mhla_stream import mhla_attention
    outs, t = [], 0
    for n in cuts:
        o, state = mhla_attention(q[:, t:t + n], k[:, t:t + n], v[:, t:t + n], m, block_size=C, state=state,
                                  return_state=True, backend=backend, policy=policy)
        outs.append(o)
        t += n
    return torch.cat(outs, 1), state


@pytest.fixture
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


STORY = ("Once upon a time there was a little fox who lived in a green forest. Every morning the fox ran to the "
         "river to drink and to look at the fish. One day she met an old turtle who told her about the sea. "
         "\"The sea is big and blue,\" said the turtle, \"and it never ends.\" The fox wanted to see it. ")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random MHLA model (L = 4 blocks of 8) with a small SentencePiece tokenizer, saved to disk."""
    import io

    import sentencepiece as spm

    from mhla_stream import MHLAForCausalLM, preset_config
    d = tmp_path_factory.mktemp("tiny")
    text = [s.strip() + "." for s in (STORY * 20).split(".") if s.strip()] + ["café naïve über 東京 ✓"] * 5
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=300, model_type="bpe",
                                   byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    torch.manual_seed(1234)
    model = MHLAForCausalLM(preset_config("mhla-tiny", vocab_size=300))
    with torch.no_grad():
        for layer in model.model.layers:  # a non-uniform mixing matrix makes bugs visible
            layer.attn.mixing_matrix.copy_(torch.rand(4, 4).tril() + 0.05)
    model.save_pretrained(d)
    return d


@pytest.fixture
def no_triton_interpreter(monkeypatch):
    """As if TRITON_INTERPRET were unset: the environment is read once per process
    (``mhla_stream.switches``), so the switch is replaced and cached plans are dropped."""
    from mhla_stream import switches as sw
    from mhla_stream.plan import make_plan
    off = sw.Switches(interpret=False, fused_decode=True, pdl=True, compile=True)
    monkeypatch.setattr(sw, "switches", lambda: off)
    monkeypatch.setattr("mhla_stream.plan.switches", sw.switches)
    make_plan.cache_clear()
    yield
    make_plan.cache_clear()
