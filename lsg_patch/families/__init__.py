"""One module per model family: its LSG self-attention module and the hooks that feed it."""
