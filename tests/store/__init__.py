"""Tests of eecp.store."""
