"""dept-server: the DEPT coordinator (CLI, servicer, checkpoints, metrics)."""
