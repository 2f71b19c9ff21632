"""Prototype of a warm engine start (issue 17); see docs/warm-engine.md."""
