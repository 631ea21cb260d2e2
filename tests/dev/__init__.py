"""Tests of eecp.dev."""
