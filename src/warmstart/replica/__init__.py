"""Where a restored worker lives: fresh namespaces of its own, or a running placeholder's."""
