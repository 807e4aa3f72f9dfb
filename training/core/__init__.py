"""Torch only, no console and no files: the model, losses, metrics, TTA, the step/epoch/evaluate engine, device choice and the measures (complexity, latency, memory)."""
