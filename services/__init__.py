"""Genie's services: the gRPC gateway, the Triton model services and their launcher, and (later) workers."""
