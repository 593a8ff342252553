"""Fakes for the tests: loopback servers and a queue-backed adapter."""
