"""Compression methods, one folder each."""
