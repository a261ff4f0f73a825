"""The redis sink (being written)."""
