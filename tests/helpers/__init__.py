"""Tiny synthetic models and data shared by the tests."""
