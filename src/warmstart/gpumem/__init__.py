"""In-worker GPU memory: CUDA VMM regions, copy engines and the bf16 codec. Imported inside the worker only."""
