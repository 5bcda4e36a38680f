"""The checkpoint artifact: a directory with `manifest.json` and CRIU's images under `images/`."""
