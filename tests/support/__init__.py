"""Test and benchmark support code: a fake hub and an offline hub cache (not part of mechgen)."""
