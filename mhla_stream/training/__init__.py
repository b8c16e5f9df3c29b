"""Training pieces behind ``mhla-train``: distributed set-up, data, checkpoints, the fused loss, FLOP counts."""
