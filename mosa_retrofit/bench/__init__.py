"""Benchmarks (reached from the CLI as ``mosa-retrofit bench ...``)."""
