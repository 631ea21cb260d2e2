"""Tests of eecp.patches."""
