"""Offline OFA checkpoints in the ModelScope hub's exact layout, built here (no hub needed)."""
