"""Kubernetes: the node agent, the Checkpoint resource, and the placeholder container's init."""
