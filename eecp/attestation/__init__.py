"""Judging a quote: dcap-qvl verification, collateral, allowlists, policy, the engine,
and the ``eecp verify-quote`` tool."""
