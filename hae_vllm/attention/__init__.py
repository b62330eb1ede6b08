"""Attention backends with eviction support: holes skipped, first decoder layer scored.

Each module subclasses one upstream backend and keeps its ``get_name()``; the plugin registers
it as an override of that backend (``vllm.v1.attention.backends.registry.register_backend``).
With eviction off both subclasses are pass-through.
"""
