"""Tests of eecp.core."""
