"""Batch 1's folded LM head (the final norm and the head as one skinny product, ``MHLAForCausalLM
._head_folds``) never changes what a user's changes to the model see: hooks on the base model, a
``forward`` set on the head, global module hooks, a head of the wrong width, a head that fails.
Each case against the plain path (found by a review of session 21's change). Runs under
TRITON_INTERPRET=1 on a CPU, natively on a GPU."""
import types

import pytest
import torch
from conftest import rel_err

import mhla_stream.modeling as modeling
from mhla_stream import MHLACache, MHLAForCausalLM, preset_config

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _tiny():
    torch.manual_seed(0)
    return MHLAForCausalLM(preset_config("mhla-tiny")).to(DEV).eval()


def _step(model, ids, plan, cache=None):
    cache = cache or MHLACache(model.new_state(1))
    with torch.inference_mode():
        model(ids[:, :5], past_key_values=cache, plan=plan)
        return model(ids[:, 5:6], past_key_values=cache, plan=plan).logits, cache


def _setup():
    model = _tiny()
    return model, model.make_plan(1, backend="triton", fused_decode=True), torch.randint(3, 256, (1, 6), device=DEV)


def test_a_hook_on_the_base_model_sees_hidden_states_not_logits():
    model, plan, ids = _setup()
    ref, _ = _step(model, ids, plan)
    shapes = []
    model.model.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    got, _ = _step(model, ids, plan)
    assert shapes[-1] == (1, 1, model.config.hidden_size)
    assert rel_err(got, ref) < 1e-5


def test_a_forward_replaced_on_the_head_instance_is_called():
    model, plan, ids = _setup()
    plain = model.lm_head.forward
    model.lm_head.forward = types.MethodType(lambda self, h: plain(h) + 100.0, model.lm_head)
    got, _ = _step(model, ids, plan)
    assert float(got.min()) > 50.0


def test_a_global_module_hook_is_called():
    model, plan, ids = _setup()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(m) if m is model.lm_head else None)
    try:
        _step(model, ids, plan)
    finally:
        handle.remove()
    assert len(seen) == 2  # the prefill's head and the step's


def test_a_head_of_the_wrong_width_fails_as_the_plain_path_and_leaves_the_stream_whole():
    model, plan, ids = _setup()
    D, V = model.config.hidden_size, model.config.vocab_size
    model.lm_head = torch.nn.Linear(D + 16, V, bias=False, device=DEV)
    cache = MHLACache(model.new_state(1))
    with torch.inference_mode():
        model.model(ids[:, :5], states=cache.states, plan=plan)
        with pytest.raises(RuntimeError):  # F.linear's own shape error
            model(ids[:, 5:6], past_key_values=cache, plan=plan)
    assert cache.seen == 6  # the states hold the token, and the positions say so


def test_a_head_product_that_fails_still_moves_the_positions(monkeypatch):
    model, plan, ids = _setup()
    real = modeling.skinny_linear

    def failing(x, w, **kw):
        if w is model.lm_head.weight:
            raise RuntimeError("the head failed")
        return real(x, w, **kw)
    cache = MHLACache(model.new_state(1))
    with torch.inference_mode():
        model(ids[:, :5], past_key_values=cache, plan=plan)
        monkeypatch.setattr(modeling, "skinny_linear", failing)
        with pytest.raises(RuntimeError, match="the head failed"):
            model(ids[:, 5:6], past_key_values=cache, plan=plan)
    assert cache.seen == 6 and all(int(s.pos[0]) == 6 for s in cache.states)


def test_the_base_model_refuses_a_head_with_a_bias():
    model, plan, ids = _setup()
    cache = MHLACache(model.new_state(1))
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, device=DEV)
    with torch.inference_mode(), pytest.raises(ValueError, match="without bias"):
        model.model(ids[:, :1], states=cache.states, plan=plan, head=head)
    assert cache.seen == 0
