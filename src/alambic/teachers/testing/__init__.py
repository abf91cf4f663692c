"""Loopback test doubles for served teachers: a prompt-logprob server around a real model."""
