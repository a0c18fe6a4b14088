"""Benchmarks whose results are committed under benchmarks/results/ (JSON with machine, commit, command)."""
