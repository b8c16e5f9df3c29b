"""Training pieces behind ``mhla-train``: distributed set-up, data, checkpoints, the fused loss, FLOP counts."""

ARCHS = ("mhla", "linear", "transformer", "gla")  # gla: fla's GLAForCausalLM (fla optional)  # what mhla-train builds (plain data: the CLI reads it cheaply)
