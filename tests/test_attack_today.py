"""Hostile cases for the surfaces added on 2026-11-22: ``state_dtype`` (stream, snapshots, files,
server sessions, command lines), ``mhla-serve --prefill-piece``, the server's text table, the Triton
backward, ``mhla-train --attn-backend``, ``mhla-bench --fused-decode`` and ``profile_model``.
Bad values give one clear line (exit 2 on a command line, an OpenAI 4xx body over HTTP) and a
failed operation leaves everything as it was."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import random

import pytest
import torch
from click.testing import CliRunner
from conftest import STORY, rand_qkv
from safetensors import safe_open
from test_attack_inputs import TINY, train_data  # noqa: F401  (a fixture)
from test_attack_state_files import assert_unchanged, craft, live

from mhla_stream import StateFileError, StreamingMHLA, mhla_attention
from mhla_stream.cli import bench, chat, eval_long, generate, profile_model, serve, train
from mhla_stream.state import MHLAState

GPU = torch.cuda.is_available()


def one_line_exit_2(cmd, args, not_called=None):
    """Runs a click command in-process: exit status 2, a message, never a traceback."""
    r = CliRunner().invoke(cmd.main, args)
    assert isinstance(r.exception, SystemExit) and r.exit_code == 2, (r.exception, r.output[-2000:])
    assert "Traceback" not in r.output
    return r.output


# -- state_dtype: the stream and its snapshots ---------------------------------------------------------
@pytest.mark.parametrize("bad", [torch.float16, "BF16", 3, "", True, b"bf16", "bf16 ", "torch.float32"])
def test_stream_refuses_bad_state_dtypes_and_the_shared_model_is_untouched(tiny_dir, bad):
    s = StreamingMHLA.from_pretrained(tiny_dir)
    s.feed("Tom had a red ball")
    before = live(s)
    with pytest.raises(ValueError, match="state_dtype must be") as e:
        StreamingMHLA(s.model, s.tokenizer, state_dtype=bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="state_dtype must be"):
        s.model.new_state(1, state_dtype=bad)
    assert_unchanged(s, before)
    assert s.state_dtype == torch.float32 and s.model.new_state(1)[0].ring.dtype == torch.float32


@pytest.mark.parametrize("mine,theirs", [(None, "bf16"), ("bf16", None)])
def test_failed_cross_dtype_load_and_restore_leave_the_stream_continuing_as_before(tiny_dir, tmp_path, mine, theirs):
    s = StreamingMHLA.from_pretrained(tiny_dir, state_dtype=mine)
    other = StreamingMHLA(s.model, s.tokenizer, state_dtype=theirs)
    other.feed(STORY)
    other.save_state(tmp_path / "other.mhla")
    s.feed("Tom had a red ball")
    twin = StreamingMHLA(s.model, s.tokenizer, state_dtype=mine)
    twin.restore(s.snapshot())
    before = live(s)
    with pytest.raises(StateFileError, match="block summaries in"):
        s.load_state(tmp_path / "other.mhla")
    with pytest.raises(ValueError, match="stores its block summaries in"):
        s.restore(other.snapshot())
    assert_unchanged(s, before)
    # the stream continues exactly as one that never saw the failed load
    assert list(s.generate_ids(max_new_tokens=12, temperature=0)) == \
        list(twin.generate_ids(max_new_tokens=12, temperature=0))


def test_snapshots_whose_fields_lie_are_refused_before_anything_is_read(tiny_dir):
    s = StreamingMHLA.from_pretrained(tiny_dir, state_dtype="bf16")
    s.feed(STORY)
    snap = s.snapshot()
    s.feed(" The fox ran")
    before = live(s)
    mixed = [st.clone() for st in snap.states]
    mixed[1].ring = mixed[1].ring.float()  # one layer of the other dtype
    wide = [st.clone() for st in snap.states]
    wide[0].prefix = wide[0].prefix.bfloat16()  # the ring's dtype right, another tensor narrowed
    cases = [(dict(history=[1.5]), TypeError, "history must be a list of int"),  # never cast to an id
             (dict(history=[True]), TypeError, "history must be a list of int"),
             (dict(history=[2 ** 70]), ValueError, "token ids outside"),
             (dict(history=None), TypeError, "history must be"),
             (dict(history="abc"), TypeError, "history must be"),
             (dict(logits=[1.0]), TypeError, "logits must be a tensor"),
             (dict(logits=snap.logits.half()), ValueError, "logits have shape"),
             (dict(states=None), TypeError, "states must be a list of MHLAState"),
             (dict(states=[None] * len(snap.states)), TypeError, "states must be a list of MHLAState"),
             (dict(states=mixed), ValueError, "bfloat16, float32"),
             (dict(states=wide), ValueError, "layers.0.prefix"),
             (dict(position=True), ValueError, "position must be an int"),
             (dict(position="5"), ValueError, "position must be an int")]
    for change, kind, match in cases:
        with pytest.raises(kind, match=match) as e:
            s.restore(dataclasses.replace(snap, **change))
        assert "\n" not in str(e.value) and len(str(e.value)) < 300
        assert_unchanged(s, before)
    s.restore(dataclasses.replace(snap, states=tuple(snap.states)))  # a tuple of the right states is fine
    assert s.position == snap.position


def test_copy_between_ring_dtypes_is_refused_before_any_tensor_is_copied():
    a = MHLAState.empty(1, 2, 4, 4, num_blocks=3, policy="window+far")
    b = MHLAState.empty(1, 2, 4, 4, num_blocks=3, policy="window+far", state_dtype="bf16")
    for t in (b.far, b.prefix, b.partial):
        t.fill_(1.0)
    b.pos.fill_(7)
    with pytest.raises(ValueError, match="ring is bfloat16 into one whose ring is float32"):
        a.copy_(b)
    assert all(not bool(getattr(a, n).any()) for n in a.TENSORS)


# -- state_dtype and the server's sessions ---------------------------------------------------------------
def _session_dir(tmp_path):
    """A sessions folder with a bf16-ring session ("half") and a crafted file whose position is not a
    number ("liar", valid fingerprint and checksum), as a server of the shipped model would find them."""
    from mhla_stream.serve.sessions import SessionData, SessionStore, file_name
    from mhla_stream.state_io import StateLayout, model_fingerprint
    s = StreamingMHLA.from_pretrained(state_dtype="bf16")
    m = s.model
    layout = StateLayout.of(m.new_state(1, device="meta", state_dtype="bf16"), m.config.vocab_size,
                            model_fingerprint(m))
    d = tmp_path / "sessions"
    store = SessionStore(str(d), 1 << 30, layout, {"model_name": "t", "policy": m.config.mixing_policy,
                                                    "state_dtype": "bfloat16", "config": "{}"})
    s.feed("Once upon a time")
    tensors = {f"layers.{i}.{n}": getattr(st, n).clone() for i, st in enumerate(s.cache.states) for n in st.TENSORS}
    store.acquire("half")
    store.release("half", SessionData(tensors, s._logits.clone(), list(s._history), s.position))
    assert store.flush() == 1
    with safe_open(str(d / file_name("half")), "pt") as f:
        meta, t = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta = {k: v for k, v in meta.items() if k != "sha256"}
    craft(d / file_name("liar"), {**meta, "session_id": "liar", "position": "x"}, t)
    return s, d


def test_sessions_of_another_dtype_or_lying_about_their_position_get_a_409_and_are_kept(tmp_path):
    import httpx

    from mhla_stream.serve.hostbench import FakeRunner
    from mhla_stream.serve.server import build_server
    from mhla_stream.serve.sessions import file_name
    ref, d = _session_dir(tmp_path)
    files = {sid: (d / file_name(sid)).read_bytes() for sid in ("half", "liar")}
    fp32 = StreamingMHLA(ref.model, ref.tokenizer)  # the server's ring is fp32 (the default)
    runner = FakeRunner(ref.tokenizer, ref.model.config.vocab_size, 2, 64)
    # the crafted position used to stop the server from starting (int("x") in the recovery)
    app = build_server(fp32.model, ref.tokenizer, model_name="t", max_batch=2, prefill_chunk=64,
                       sessions_dir=str(d), runner=runner)

    async def run():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                listed = {x["id"] for x in (await client.get("/v1/sessions")).json()["data"]}
                out = []
                for sid in ("half", "liar"):
                    for stream in (False, True):
                        out.append(await client.post("/v1/completions", json={
                            "prompt": " x", "max_tokens": 2, "session": sid, "stream": stream}))
                return listed, out, (await client.get("/health")).status_code

    listed, replies, health = asyncio.run(run())
    assert listed == {"half", "liar"} and health == 200
    for r, match in zip(replies, ["'half': state stores its block summaries in 'bfloat16'"] * 2 + ["'liar'"] * 2):
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert match in err["message"] and err["param"] == "session" and err["code"] == "session_refused"
        assert str(d) not in err["message"]  # the client is told about its session, not the server's folder
    assert {sid: (d / file_name(sid)).read_bytes() for sid in ("half", "liar")} == files


# -- command lines -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd,extra", [(generate, ["hi"]), (chat, []), (bench, []), (serve, [])])
@pytest.mark.parametrize("bad", ["fp16", "", "BF16", "float16"])
def test_state_dtype_option_refuses_bad_names(cmd, extra, bad):
    out = one_line_exit_2(cmd, ["--state-dtype", bad, *extra])
    assert "--state-dtype" in out


@pytest.mark.parametrize("value", ["fp32,fp16", ",", "", "BF16", "bf16;fp32"])
def test_eval_long_state_dtype_list_refuses_bad_names(value):
    out = one_line_exit_2(eval_long, ["--state-dtype", value])  # at parse time, before the model loads
    assert "--state-dtype" in out and "comma-separated list of fp32" in out


def _no_model_load(monkeypatch):
    from mhla_stream.cli import common

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")
    monkeypatch.setattr(common, "load_model", refuse)  # serve imports it when it runs
    monkeypatch.setattr(bench, "load_model", refuse)  # bench at import


@pytest.mark.parametrize("args,match", [
    (["--prefill-piece", "600"], "600 is larger than the prefill chunk (512, the default on cpu)"),
    (["--prefill-piece", "65", "--prefill-chunk", "64"], "65 is larger than the prefill chunk (64)"),
    (["--prefill-piece", "0"], "--prefill-piece"), (["--prefill-chunk", "0"], "--prefill-chunk"),
])
def test_serve_prefill_piece_is_at_most_the_chunk(monkeypatch, args, match):
    _no_model_load(monkeypatch)
    out = one_line_exit_2(serve, ["--device", "cpu", *args])
    assert match in out


@pytest.mark.skipif(GPU, reason="the CPU refusal; on CUDA --fused-decode on runs")
@pytest.mark.parametrize("backend", ["auto", "torch", "numba"])
def test_bench_fused_decode_on_without_triton_is_one_line(monkeypatch, backend):
    # it used to run and crash in the CUDA-graph capture of a CPU model (make_plan forced it on)
    _no_model_load(monkeypatch)
    out = one_line_exit_2(bench, ["--model", "mhla-stories-17m", "--device", "cpu", "--backend", backend,
                                  "--fused-decode", "on"])
    assert "--fused-decode on" in out and "Triton" in out
    from mhla_stream.plan import make_plan
    assert not make_plan("cpu", torch.float32, 1, backend=backend, fused_decode=True).fused_decode


@pytest.mark.parametrize("args", [["--fused-decode", "bogus"], ["--fused-decode", ""], ["--prefill-chunk", "0"],
                                  ["--batch", "0"], ["--batch", "1,,2"], ["--batch", "-1"], ["--prompt-len", "x"]])
def test_bench_bad_values(monkeypatch, args):
    _no_model_load(monkeypatch)
    one_line_exit_2(bench, ["--model", "mhla-stories-17m", "--device", "cpu", *args])


@pytest.mark.parametrize("args", [["--batch", "0"], ["--batch", "x"], ["--fused-decode", "maybe"]])
def test_profile_model_bad_values(args):
    assert "Invalid value" in one_line_exit_2(profile_model, args)


@pytest.mark.skipif(GPU, reason="the CPU refusal")
def test_profile_model_without_cuda_is_one_line():
    assert "needs a CUDA GPU" in one_line_exit_2(profile_model, ["--batch", "2"])


def test_train_attn_backend_bad_values(train_data, tmp_path, no_triton_interpreter):  # noqa: F811
    base = ["--data", str(train_data), "--out", str(tmp_path / "o"), *TINY, "--steps", "1"]
    assert "--attn-backend" in one_line_exit_2(train, [*base, "--attn-backend", "bogus"])
    assert "--attn-backend" in one_line_exit_2(train, [*base, "--attn-backend", ""])
    if not GPU:  # triton on a CPU without the interpreter: one line before anything is made (it was a traceback)
        out = one_line_exit_2(train, [*base, "--attn-backend", "triton"])
        assert "--attn-backend triton" in out and "CUDA" in out
        assert not (tmp_path / "o").exists()


# -- the Triton backward -------------------------------------------------------------------------------------
SHAPE = dict(H=2, K=8, V=8, L=3, C=4)


def _qkv(B, T, seed=0):
    return rand_qkv(B, T, SHAPE["H"], SHAPE["K"], SHAPE["V"], SHAPE["L"], seed=seed)


def _state(B=1):
    return MHLAState.empty(B, SHAPE["H"], SHAPE["K"], SHAPE["V"], block_size=SHAPE["C"], num_blocks=SHAPE["L"],
                           policy="window")


@pytest.mark.parametrize("T,given", [(20, True), (1, True), (20, False)])
def test_triton_with_a_state_never_gives_silent_gradients(T, given):
    """Stateful Triton calls are forward-only: their output used to carry no graph, so a loss through it
    silently left q, k, v and M without their share. The forward is unchanged; a backward raises."""
    q, k, v, m = _qkv(1, T)
    with torch.no_grad():
        want = mhla_attention(q, k, v, m, block_size=SHAPE["C"], state=_state(), backend="triton")
    qg, mg = q.clone().requires_grad_(), m.clone().requires_grad_()
    out = mhla_attention(qg, k, v, mg, block_size=SHAPE["C"], backend="triton", state=_state() if given else None,
                         return_state=not given, policy=None if given else "window")
    o = out if given else out[0]
    assert torch.equal(o.detach(), want) and o.requires_grad
    with pytest.raises(RuntimeError, match="no gradients for calls with a state") as e:
        (o.sum() + qg.sum() + mg.sum()).backward()
    assert "\n" not in str(e.value)
    with torch.no_grad():  # inference is untouched: no graph at all
        assert mhla_attention(qg, k, v, mg, block_size=SHAPE["C"], state=_state(), backend="triton").grad_fn is None


def test_triton_gradients_with_zero_lengths_and_no_tokens():
    q, k, v, m = _qkv(2, 20, seed=3)
    do = torch.randn(2, 20, SHAPE["H"], SHAPE["V"], generator=torch.Generator().manual_seed(4))
    grads = {}
    for backend in ("triton", "torch"):
        xs = [x.clone().requires_grad_() for x in (q, k, v, m)]
        o = mhla_attention(*xs, block_size=SHAPE["C"], backend=backend, lengths=torch.tensor([0, 20]))
        (o[1] * do[1]).sum().backward()  # the loss reads the valid sequence only
        grads[backend] = (o.detach(), [x.grad for x in xs])
    (o_tr, g_tr), (o_to, g_to) = grads["triton"], grads["torch"]
    assert torch.all(o_tr[0] == 0) and all(torch.all(g[0] == 0) for g in g_tr[:3])  # length 0: nothing
    assert torch.allclose(o_tr[1], o_to[1], rtol=1e-4, atol=1e-5)
    for a, b in zip(g_tr[:3], g_to[:3]):
        assert torch.allclose(a[1], b[1], rtol=1e-4, atol=1e-5)
    assert torch.allclose(g_tr[3], g_to[3], rtol=1e-4, atol=1e-4)
    # every sequence of length 0: zero output and zero gradients, no error
    xs = [x[:1].clone().requires_grad_() for x in (q, k, v)] + [m.clone().requires_grad_()]
    o = mhla_attention(*xs, block_size=SHAPE["C"], backend="triton", lengths=torch.tensor([0]))
    o.sum().backward()
    assert not o.detach().any() and all(not x.grad.any() for x in xs)
    for backend in ("triton", "torch"):  # T = 0 is refused in one line, with or without gradients
        with pytest.raises(ValueError, match="T = 0 tokens"):
            mhla_attention(q[:, :0].requires_grad_(), k[:, :0], v[:, :0], m, block_size=SHAPE["C"], backend=backend)
    for bad in (torch.tensor([21, 20]), torch.tensor([-1, 3]), torch.tensor([1.0, 2.0]), torch.tensor([3])):
        with pytest.raises(ValueError, match="lengths must"):
            mhla_attention(q.requires_grad_(), k, v, m, block_size=SHAPE["C"], backend="triton", lengths=bad)


def test_triton_backward_refuses_second_order_gradients():
    """The backward's kernels record no graph: a gradient penalty through them used to be silently 0."""
    q, k, v, m = _qkv(1, 20, seed=5)
    qg = q.clone().requires_grad_()
    o = mhla_attention(qg, k, v, m, block_size=SHAPE["C"], backend="triton")
    g, = torch.autograd.grad((o ** 2).sum(), qg, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        ((g ** 2).sum() + qg.sum()).backward()


@pytest.mark.parametrize("value,on", [("0", False), ("false", False), (" OFF ", False), ("No", False),
                                      ("1", True), ("", True), ("yes", True)])
def test_triton_train_switch_values(monkeypatch, value, on):
    from mhla_stream import switches as sw
    from mhla_stream.plan import make_plan
    monkeypatch.setenv("MHLA_STREAM_TRITON_TRAIN", value)
    sw.switches.cache_clear()
    make_plan.cache_clear()
    try:
        assert sw.switches().triton_train is on
        plan = make_plan("cpu", torch.float32, 1, backend="triton")
        assert plan.train_backend == ("triton" if on else "torch")
    finally:
        monkeypatch.undo()
        sw.switches.cache_clear()
        make_plan.cache_clear()


# -- the server's text: the table fast path against the tokenizer's decode ------------------------------------
@pytest.fixture(scope="module")
def shipped():
    return StreamingMHLA.from_pretrained()


def _assembled(tok, ids, prefix, stops=()):
    from test_serve_host import _assembled as assembled_with_pieces  # the one helper for the server's text
    return assembled_with_pieces(tok, ids, prefix, stops)[0]


def _want(tok, ids, prefix, stops=()):
    """The tokenizer's decode of the whole sequence, less the prefix's text, cut at the first stop."""
    whole, head = tok.decode(prefix + ids), tok.decode(prefix)
    assert whole.startswith(head)
    text = whole[len(head):]
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


def test_text_is_the_tokenizers_decode_for_every_special_and_byte_piece(shipped):
    from mhla_stream.serve.text import plain_surfaces
    tok = shipped.tokenizer
    surfaces = plain_surfaces(tok)
    odd = [i for i, s in enumerate(surfaces) if s is None]
    plain = [i for i, s in enumerate(surfaces) if s is not None]
    assert len(odd) == 259 and {tok.bos_id, tok.eos_id, 0} <= set(odd)  # 256 bytes, <unk>, <s>, </s>
    for first in (tok.encode("Once")[-1], surfaces.index(" ")):  # every plain piece's table entry, after another
        assert [i for i in plain if tok.decode([first, i]) != tok.decode([first]) + surfaces[i]] == []
    story = tok.encode("Once upon a time, Lily said")
    smile = tok.encode("a🙂b")  # byte fallback: 🙂 is four byte pieces
    assert len(smile) >= 5
    cases = []
    for o in odd:  # every special and byte piece at the start, between plain pieces, at the end and as prefix
        cases += [([o], []), (story[:3] + [o] + story[3:], []), (story + [o], [tok.bos_id]), (story, [o])]
    cases += [(smile, []), (smile[:-2], story), (smile[:2] + story, []), (story + smile[:3], []),
              (smile + smile[1:3] + story, [tok.bos_id])]  # complete, cut at the end, cut in the middle
    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.choice(odd) if rng.random() < 0.3 else rng.choice(plain) for _ in range(rng.randrange(1, 30))]
        cases.append((ids, [rng.choice(plain + odd) for _ in range(rng.randrange(0, 10))]))
    for ids, prefix in cases:
        assert _assembled(tok, ids, prefix) == _want(tok, ids, prefix), (ids, prefix)
    # stop strings split across tokens, inside a character of several byte pieces, and U+FFFD itself
    text = tok.decode(story)
    split = text[text.index("upon") + 2: text.index("upon") + 6]  # "on a": spans two pieces
    for ids, prefix in cases[-300:-250] + [(story, []), (smile + story, []), (story + smile[:3], [])]:
        for stops in ([split], ["🙂"], ["\ufffd"], [".", " the"], ["zzz"]):
            assert _assembled(tok, ids, prefix, stops) == _want(tok, ids, prefix, stops), (ids, prefix, stops)


def test_library_stream_text_is_the_tokenizers_decode_too(shipped, monkeypatch):
    """``StreamingMHLA.stream`` (the same decoder): an unfinished character at the end is shown as the
    tokenizer shows it, not dropped."""
    tok = shipped.tokenizer
    smile = tok.encode("a🙂b")
    for ids, stops in ((smile[:3], None), (smile, None), (smile + smile[:2], ["b"]), (smile[:2], ["\ufffd"])):
        shipped.reset()
        shipped.feed("Once")
        prefix = list(shipped._history)[-8:]
        monkeypatch.setattr(shipped, "generate_ids", lambda *a, _ids=ids, **k: iter(_ids))
        got = "".join(shipped.stream(max_new_tokens=len(ids), stop=stops))
        assert got == _want(tok, ids, prefix, stops or ()), (ids, stops)
        monkeypatch.undo()
    shipped.reset()


def test_sessions_dir_recovery_skips_nothing_and_crashes_on_nothing(tmp_path):
    """A session file that lies about its position is indexed (its read refuses it, naming the session)."""
    from mhla_stream.serve.sessions import SessionStore
    from mhla_stream.state_io import StateLayout, model_fingerprint
    ref, d = _session_dir(tmp_path)
    m = ref.model
    layout = StateLayout.of(m.new_state(1, device="meta", state_dtype="bf16"), m.config.vocab_size,
                            model_fingerprint(m))
    store = SessionStore(str(d), 1 << 30, layout, {})
    assert {x["id"] for x in store.describe()} == {"half", "liar"}
    store.acquire("liar")
    with pytest.raises(StateFileError, match=r"^session 'liar': position 'x' is not an int") as e:
        store.load("liar")
    assert os.fspath(d) not in str(e.value)
    store.release("liar", None)
    store.acquire("half")
    assert store.load("half").position == ref.position
