"""The HTTP gateway (``sluice serve``): trigger URLs, the task API, auth, metrics, health."""
