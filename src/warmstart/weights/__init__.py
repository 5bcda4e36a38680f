"""The weight service: model weights kept resident in one process and mapped by workers (docs/weights.md)."""
