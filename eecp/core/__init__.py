"""The ground floor: configuration, the error tree, the clock, worker threads, logs,
rate limits, metrics and connection capacity. Imports nothing else of eecp."""
