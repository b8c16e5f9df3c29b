"""Training pieces behind ``mhla-train``: distributed set-up, data, checkpoints, the fused loss, FLOP counts."""

# what mhla-train builds (plain data: the CLI reads it cheaply); gla is fla's GLAForCausalLM (fla is optional)
ARCHS = ("mhla", "linear", "transformer", "gla")
