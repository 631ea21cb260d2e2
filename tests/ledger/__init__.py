"""Tests of the ledger's pure core (eecp/ledger/): plain synchronous pytest and hypothesis."""
