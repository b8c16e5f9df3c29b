"""Named architectures (plain data: the command line reads them without importing transformers)."""
from __future__ import annotations

# The paper's NLP run (SPEC section 3); weights come from the user.
PRESETS: dict[str, dict] = {
    "mhla-340m": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_heads=4, expand_k=0.5,
                      expand_v=1.0, hidden_ratio=4, norm_eps=1e-6, block_size=64, num_blocks=32,
                      bos_token_id=1, eos_token_id=2),
    # Tiny shapes for tests: a few blocks so that streaming crosses the trained edge quickly.
    "mhla-tiny": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=2, expand_k=0.5,
                      expand_v=1.0, hidden_ratio=2, norm_eps=1e-6, block_size=8, num_blocks=4,
                      bos_token_id=1, eos_token_id=2),
}
