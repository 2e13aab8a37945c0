"""Helpers shared by the test modules (plain modules; tests import them, never each other)."""
