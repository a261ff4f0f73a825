"""The redis source (being written)."""
