"""Tests of eecp.attestation."""
