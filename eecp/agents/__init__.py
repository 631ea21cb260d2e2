"""The agent directory and the live tunnels: registration rules, the registry, admission,
sessions and the tunnel router."""
