"""Quiesce and resume a worker around a checkpoint: through the SDK's control directory, an engine's HTTP API, or not at all."""
