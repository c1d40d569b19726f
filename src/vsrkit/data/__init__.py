"""Data: the papers' degradations, datasets and frame I/O."""
