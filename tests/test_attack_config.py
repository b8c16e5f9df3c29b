"""Config fuzzing: every MHLAConfig field is type- and range-checked with one clear ValueError,
absurd sizes are refused before anything is allocated, and a bad config.json is a CheckpointError."""
import json
import math
import random

import pytest
import torch

from mhla_stream import CheckpointError, MHLAConfig, MHLAForCausalLM, preset_config

BAD = {
    "vocab_size": [0, -1, 2.5, "8192", True, None, 10 ** 9],
    "hidden_size": [0, -64, 64.0, "64", False, 10 ** 7],
    "num_hidden_layers": [0, -2, 1.5, "2", 10 ** 7],
    "num_heads": [0, -2, 2.0, "2", None],
    "block_size": [0, -8, 8.5, "8"],
    "num_blocks": [0, -4, 4.0, "4"],
    "rope_theta": [0, -10000.0, float("inf"), float("nan"), "10000", None],
    "norm_eps": ["1e-6", 0, -1e-6, float("nan"), 1.5, None],
    "expand_k": [0, -0.5, float("inf"), "0.5"],
    "expand_v": [0, float("nan")],
    "hidden_ratio": [0, -4, "4"],
    "intermediate_size": [-1, 2.5, "256"],
    "bos_token_id": [-1, 256, 1.0, "1"],
    "eos_token_id": [-2, 10 ** 6],
    "pad_token_id": [256, "0"],
    "mixing_policy": ["sliding", 3, None],
    "tie_word_embeddings": ["yes", 1],
}


@pytest.mark.parametrize("field,value", [(f, v) for f, vs in BAD.items() for v in vs])
def test_each_bad_value_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field.replace("mixing_policy", "(mixing_)?policy")) as e:
        preset_config("mhla-tiny", **{field: value})
    assert "\n" not in str(e.value)


def test_absurd_sizes_are_refused_before_allocating():
    for kw in (dict(hidden_size=1 << 20, num_heads=4), dict(num_hidden_layers=100_000, hidden_size=4096),
               dict(num_blocks=1 << 20, hidden_size=4096, num_heads=4)):
        with pytest.raises(ValueError, match="parameters|GiB of streaming state|must be an int in"):
            preset_config("mhla-340m", **kw)


def test_good_configs_still_build():
    for name in ("mhla-tiny", "mhla-340m"):
        with torch.device("meta"):
            MHLAForCausalLM(preset_config(name))
    assert preset_config("mhla-tiny", bos_token_id=None, eos_token_id=None).eos_token_id is None


def test_random_fuzz_raises_only_value_errors():
    """Random mixes of good and bad values: either a config that builds on the meta device, or a ValueError."""
    rng = random.Random(14)
    good = {k: v for k, v in preset_config("mhla-tiny").to_dict().items() if k in BAD}
    pool = {k: vs + [good[k]] * 3 for k, vs in BAD.items()}
    built = refused = 0
    for _ in range(300):
        kw = {k: rng.choice(pool[k]) for k in rng.sample(sorted(pool), rng.randint(1, 4))}
        try:
            cfg = preset_config("mhla-tiny", **kw)
        except ValueError as e:
            assert str(e) and "\n" not in str(e)
            refused += 1
            continue
        with torch.device("meta"):
            MHLAForCausalLM(cfg)
        assert math.isfinite(cfg.rope_theta) and cfg.num_heads > 0
        built += 1
    assert built > 10 and refused > 100


@pytest.mark.parametrize("change", [{"num_heads": 0}, {"rope_theta": -1}, {"block_size": 0}, {"norm_eps": "x"},
                                    {"vocab_size": "many"}, {"bos_token_id": 10 ** 6}])
def test_bad_config_json_is_a_checkpoint_error(tiny_dir, tmp_path, change):
    import shutil
    d = tmp_path / "c"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match="invalid mhla config"):
        MHLAForCausalLM.from_pretrained(d)


def test_config_round_trips_through_transformers(tmp_path):
    cfg = preset_config("mhla-tiny")
    cfg.save_pretrained(tmp_path)
    again = MHLAConfig.from_pretrained(tmp_path)
    assert again.to_dict()["hidden_size"] == cfg.hidden_size
