"""Loopback test doubles for teacher APIs: a rule-based OpenAI-compatible server and a fault-injecting proxy."""
