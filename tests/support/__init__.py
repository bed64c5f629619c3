"""Helpers shared by the test suites; the session fixtures themselves live in tests/conftest.py."""
