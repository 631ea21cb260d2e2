"""Process-wide changes to third-party libraries (hypercorn, wsproto), applied once at
start and checked against the versions they were written for."""
