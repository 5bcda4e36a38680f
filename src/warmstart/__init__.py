"""warmstart: checkpoint warm inference workers and restore them in seconds."""

__version__ = "0.1.0"
