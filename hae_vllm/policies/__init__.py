"""Eviction policies: each scores tokens and selects victims; the engine does the rest."""
