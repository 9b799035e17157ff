"""Training: the plain trainer (loop), the run directory, and the engines (in-process, Ray Train)."""
