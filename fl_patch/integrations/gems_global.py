"""gems_global integration (being written)."""

TARGETS = []
