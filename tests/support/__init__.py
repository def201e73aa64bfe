"""Helpers shared by the test suites (real processes: etcd, ...)."""
