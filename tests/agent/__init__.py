"""Tests of the agent (the top-level agent package)."""
