"""The language model against an independent forward of SPEC section 3; checkpoints in both layouts."""
import pytest
import torch
from conftest import rel_err
from refckpt import SMALL, plain_forward, reference_state_dict, write_reference_checkpoint

from mhla_stream import MHLAConfig, MHLAForCausalLM, preset_config
from mhla_stream.configuration import mlp_intermediate_size


@pytest.mark.parametrize("fmt,shards", [("safetensors", 1), ("bin", 1), ("safetensors", 3), ("bin", 2)])
def test_reference_checkpoint_logits_match_plain_forward(tmp_path, fmt, shards):
    sd = reference_state_dict(seed=shards)
    write_reference_checkpoint(tmp_path, sd, fmt, shards)
    model = MHLAForCausalLM.from_pretrained(tmp_path)
    assert model.config.num_blocks == SMALL["L"] and model.config.block_size == SMALL["C"]
    ids = torch.randint(0, SMALL["vocab_size"], (2, 45))  # 45 tokens: past the trained 4 x 8 = 32
    with torch.no_grad():
        logits = model(ids).logits
    # plain forward covers the trained blocks exactly; compare there
    assert rel_err(logits[:, :32], plain_forward(sd, ids[:, :32])) < 1e-5
    mix = model.model.layers[0].attn.mixing_matrix.detach()
    assert float(mix.triu(1).abs().max()) == 0 and float(mix.tril().min()) >= 0


def test_auto_classes_load_this_layout(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    model = MHLAForCausalLM(preset_config("mhla-tiny"))
    model.save_pretrained(tmp_path / "own")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "own"), MHLAConfig)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "own")).__name__ == "MHLAForCausalLM"


def test_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = MHLAForCausalLM(preset_config("mhla-tiny", mixing_policy="window"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path)
    again = MHLAForCausalLM.from_pretrained(tmp_path)
    assert again.config.to_dict() == model.config.to_dict()
    assert model.state_dict().keys() == again.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, again(ids).logits)


def test_mhla_340m_parameter_count():
    c = preset_config("mhla-340m")
    assert (c.head_k_dim, c.head_v_dim, c.intermediate_size) == (128, 256, 2816)
    assert mlp_intermediate_size(1024, 4) == 2816
    d, Kt, Vt, inter = 1024, 512, 1024, 2816
    per_layer = 2 * Kt * d + 2 * Vt * d + d * Vt + Vt // 4 + 32 * 32 + 2 * d + 3 * inter * d
    expected = 32000 * d + 24 * per_layer + d
    with torch.device("meta"):
        model = MHLAForCausalLM(c)
    assert sum(p.numel() for p in model.parameters()) == expected == 341_130_240


def test_training_forward_has_gradients():
    model = MHLAForCausalLM(preset_config("mhla-tiny")).train()
    ids = torch.randint(0, 256, (2, 50))
    out = model(ids, labels=ids)
    out.loss.backward()
    grad = model.model.layers[0].attn.mixing_matrix.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_model_loaded_under_inference_mode_prepares_and_decodes():
    """A model built inside ``torch.inference_mode()`` has inference tensors (no version
    counters): preparing the fused weights and running it must still work."""
    from mhla_stream import MHLAForCausalLM
    from mhla_stream.configuration import preset_config
    with torch.inference_mode():
        torch.manual_seed(0)
        m = MHLAForCausalLM(preset_config("mhla-tiny")).eval().prepare_inference()
        ids = torch.randint(3, m.config.vocab_size, (1, 9))
        out = m(input_ids=ids).logits
    assert torch.isfinite(out).all()


def test_an_mhla_cache_beside_generates_own_transformers_cache_is_the_stream():
    """transformers before 5.24 passes ``cache=`` through to the model and makes a DynamicCache as
    past_key_values (GPU machine, 5.17): the MHLA cache is used; two MHLA caches are refused."""
    from transformers import DynamicCache

    from mhla_stream.cache import MHLACache
    from mhla_stream.modeling import _one_cache
    model = MHLAForCausalLM(preset_config("mhla-tiny")).eval()
    a, b = MHLACache(model.new_state(1)), MHLACache(model.new_state(1))
    assert _one_cache(DynamicCache(), a) is a and _one_cache(None, a) is a and _one_cache(a, None) is a
    assert _one_cache(a, a) is a
    with pytest.raises(ValueError, match="not two different"):
        _one_cache(a, b)
    with pytest.raises(ValueError, match="not two different"):  # an MHLA cache as past_key_values stays the user's
        _one_cache(a, DynamicCache())
    ids = torch.randint(3, 200, (1, 6))
    with torch.inference_mode():
        ref = model(ids, past_key_values=MHLACache(model.new_state(1))).logits
        got = model(ids, past_key_values=DynamicCache(), cache=b).logits
    assert torch.equal(got, ref) and b.seen == 6


def test_the_cache_under_either_name():
    """transformers 5.24 renamed ``past_key_values`` to ``cache``: forward and generate take either
    name (the same stream), and refuse two different caches at once."""
    from mhla_stream.cache import MHLACache
    torch.manual_seed(0)
    model = MHLAForCausalLM(preset_config("mhla-tiny")).eval()
    ids = torch.randint(3, 200, (1, 12))
    with torch.inference_mode():
        a, b = MHLACache(model.new_state(1)), MHLACache(model.new_state(1))
        la = model(ids, past_key_values=a).logits
        lb = model(ids, cache=b).logits
        assert torch.equal(la, lb) and a.seen == b.seen == 12
        with pytest.raises(ValueError, match="not two different"):
            model(ids[:, :1], past_key_values=a, cache=b)
        assert a.seen == b.seen == 12  # refused before anything ran
        outs = []
        for kw in ("past_key_values", "cache"):
            c = MHLACache(model.new_state(1))
            outs.append(model.generate(ids, max_new_tokens=5, do_sample=False, **{kw: c}))
            assert c.seen >= 16
        assert torch.equal(outs[0], outs[1])
