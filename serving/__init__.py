"""The gRPC inference server."""
