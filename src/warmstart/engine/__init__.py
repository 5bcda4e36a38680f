"""The machinery under the pipelines: CRIU, CUDA, namespaces, launching workers."""
