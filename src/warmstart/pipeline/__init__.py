"""The pipelines: run, checkpoint and restore, each an ordered list of steps run by one runner."""
