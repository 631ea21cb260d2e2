"""Serving apps: the lean HTTP/1.1 server, forwarding rules, resolve, the proxy over
tunnels, the JSON proxy's budget and the proxy and auth listeners."""
