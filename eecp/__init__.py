"""eecp — the Easy Enclave Control Plane.

Agents inside Intel TDX VMs dial out to eecp, prove themselves with DCAP quotes and keep a
registration alive; proxies ask eecp whether an app may be served. See README.md.
"""

__version__ = "0.1.0"
