"""Tests of eecp.control."""
