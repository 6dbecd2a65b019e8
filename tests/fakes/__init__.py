"""Test doubles shared by the unit, API and end-to-end tests."""
