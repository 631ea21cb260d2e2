"""Tests of eecp.dataplane."""
