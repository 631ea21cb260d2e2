"""Tests of eecp.agents."""
