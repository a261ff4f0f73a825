"""The mqtt source (being written)."""
