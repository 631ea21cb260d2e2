"""Development only, never imported by production paths: a development PKI minting
genuine DCAP quotes, a development PCCS, and ``eecp demo``."""
