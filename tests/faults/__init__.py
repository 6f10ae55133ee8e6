"""Fault-injection helpers for tests (a byte-counting, fault-injecting TCP proxy)."""
