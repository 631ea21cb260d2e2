"""End-to-end tests: eecp, agents, front proxies and databases together, through real sockets."""
