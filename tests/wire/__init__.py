"""Tests of eecp.wire."""
