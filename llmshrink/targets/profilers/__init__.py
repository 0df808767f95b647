"""Latency profilers: measure the ops a search space can produce, in context."""
