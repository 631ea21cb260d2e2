"""What travels on a tunnel, shared with the agent: the JSON control protocol, the binary
frames, the stream multiplexer, HTTP message rules, and the measurement binding."""
