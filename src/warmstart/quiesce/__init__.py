"""Quiesce and resume a worker around a checkpoint: through the SDK's control directory (sdk.py), an engine's
HTTP API (engine.py, with one adapter per engine), or not at all; and a restored replica's resume (restored.py)."""
