"""dept-bench: reproducible measurements that print JSON."""
