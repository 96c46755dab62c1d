"""Thin gRPC adapters: convert messages, call the data plane, map errors to status codes in one place."""
