"""Layer 4, training: one trainer (run folder, optimizer, AMP, DDP, exact resume, checkpoints, the epoch loop)
and the tasks it trains (stage one, learning from labels; stage two is in ``combiner``), their samplers, losses and
recipes."""
