"""Model level: any split into forward calls equals one full forward; padding; HF generate."""
import random

import pytest
import torch
from conftest import rel_err

from mhla_stream import POLICIES, MHLACache, MHLAForCausalLM, preset_config


def tiny_model(policy, seed=0):
    torch.manual_seed(seed)
    model = MHLAForCausalLM(preset_config("mhla-tiny", mixing_policy=policy)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.mixing_matrix.copy_(torch.rand(4, 4).tril() + 0.05)
    return model


def run_split(model, ids, cuts):
    cache, outs, t = None, [], 0
    for n in cuts:
        out = model(ids[:, t:t + n], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        outs.append(out.logits)
        t += n
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("policy", POLICIES)
@torch.no_grad()
def test_any_split_gives_full_forward_logits(policy):
    model = tiny_model(policy)
    ids = torch.randint(0, 256, (2, 100))  # 100 tokens = 12.5 blocks, trained edge at 32
    full = model(ids).logits
    rng = random.Random(0)
    splits = [[1] * 100, [31, 1, 1, 40, 27], [8] * 12 + [4], [33, 67]]
    for _ in range(3):
        cuts = []
        while sum(cuts) < 100:
            cuts.append(min(rng.randint(1, 20), 100 - sum(cuts)))
        splits.append(cuts)
    for cuts in splits:
        logits, cache = run_split(model, ids, cuts)
        assert rel_err(logits, full) < 1e-5, cuts
        assert cache.get_seq_length() == 100 and cache.states[0].pos.tolist() == [100, 100]


@torch.no_grad()
def test_batch_of_two_different_lengths_with_padding():
    model = tiny_model("window+far")
    a, b = torch.randint(3, 256, (1, 70)), torch.randint(3, 256, (1, 45))
    ref_a, ref_b = model(a).logits, model(b).logits
    for side in ("left", "right"):
        pad = torch.zeros(1, 25, dtype=torch.long)
        ids = torch.cat([a, torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)])
        mask = torch.ones_like(ids)
        if side == "left":
            mask[1, :25] = 0
        else:
            mask[1, 45:] = 0
        out = model(ids, attention_mask=mask, use_cache=True)
        assert rel_err(out.logits[0], ref_a[0]) < 1e-5
        got_b = out.logits[1, 25:] if side == "left" else out.logits[1, :45]
        assert rel_err(got_b, ref_b[0]) < 1e-5
        assert out.past_key_values.states[0].pos.tolist() == [70, 45]
    # continuing: one more token each, from their own positions
    nxt = torch.randint(3, 256, (2, 1))
    step = model(nxt, past_key_values=out.past_key_values, attention_mask=torch.ones(2, 96, dtype=torch.long))
    assert rel_err(step.logits[0, 0], model(torch.cat([a, nxt[:1]], 1)).logits[0, -1]) < 1e-5
    assert rel_err(step.logits[1, 0], model(torch.cat([b, nxt[1:]], 1)).logits[0, -1]) < 1e-5


@torch.no_grad()
def test_hf_generate_greedy_matches_full_forward_argmax():
    model = tiny_model("window")
    prompt = torch.randint(3, 256, (1, 20))
    out = model.generate(prompt, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    seq = out.sequences
    assert isinstance(out.past_key_values, MHLACache)
    logits = model(seq).logits
    assert torch.equal(logits[0, 19:-1].argmax(-1), seq[0, 20:])


@torch.no_grad()
def test_hf_generate_batched_left_padding_equals_single():
    model = tiny_model("window+far")
    a, b = torch.randint(3, 256, (1, 30)), torch.randint(3, 256, (1, 18))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 12, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    both = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    one_b = model.generate(b, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(both[1, 30:], one_b[0, 18:])


@pytest.mark.parametrize("policy", POLICIES)
def test_stacked_states_are_one_tensor_per_field_and_forward_as_separate_ones(policy):
    """``new_state(stacked=True)``: each field of all layers is one [layers, B, ...] view (written through
    both ways), and the model runs on such states exactly as on separately allocated ones."""
    from mhla_stream import MHLAState
    torch.manual_seed(0)
    model = MHLAForCausalLM(preset_config("mhla-tiny", mixing_policy=policy)).eval()
    ids = torch.randint(3, 256, (3, 21))
    plain, stacked = model.new_state(3), model.new_state(3, stacked=True)
    assert all(MHLAState.stacked(plain, n) is None for n in ("ring", "prefix", "pos"))
    with torch.no_grad():
        a = model(input_ids=ids, past_key_values=MHLACache(plain), use_cache=True).logits
        b = model(input_ids=ids, past_key_values=MHLACache(stacked), use_cache=True).logits
    assert torch.equal(a, b)
    for n in MHLAState.TENSORS:
        view = MHLAState.stacked(stacked, n)
        assert view.shape == (len(stacked), *getattr(stacked[0], n).shape)
        for layer, st in enumerate(stacked):
            assert torch.equal(view[layer], getattr(st, n)) and torch.equal(getattr(st, n), getattr(plain[layer], n))
    ring = MHLAState.stacked(stacked, "ring")
    ring[1, 2].fill_(7.0)                                         # through the stack into layer 1's state
    assert bool((stacked[1].ring[2] == 7).all()) and not bool((stacked[0].ring == 7).any())
    stacked[1].pos.fill_(5)                                       # and back
    assert MHLAState.stacked(stacked, "pos")[1].tolist() == [5, 5, 5]
