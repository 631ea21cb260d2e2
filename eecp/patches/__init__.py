"""Process-wide changes to third-party libraries (hypercorn, wsproto), applied once at
start and checked against the versions they were written for (:mod:`eecp.patches.versions`).

The control plane applies both with :func:`apply_all` at its process's start (``eecp serve``,
``eecp demo``; the tests' conftest does the same); the agent installs only the wsproto one
(``eecp-agent``'s start), and never imports hypercorn for it.
"""


def apply_all() -> None:
    """Apply every patch the control plane runs with (idempotent; each logs its library's
    version once, or why it refused)."""
    # imported here, not above: importing eecp.patches.wsproto (the agent) runs this module,
    # and must not pull in hypercorn
    from eecp.patches import hypercorn, wsproto

    hypercorn.apply()
    wsproto.install()
