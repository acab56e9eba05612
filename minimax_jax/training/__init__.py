"""Training: config, Grain data pipeline, optimizer, jitted step, checkpoints, metrics, loop."""
