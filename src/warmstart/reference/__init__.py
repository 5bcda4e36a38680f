"""The reference worker: a small Llama-shaped model behind an OpenAI-compatible HTTP server."""
