"""The mqtt sink (being written)."""
