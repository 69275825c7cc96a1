"""lightx2v integration (being written)."""

TARGETS = []
