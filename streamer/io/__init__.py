"""Codecs for events, outputs and dead letters, and file readers and writers."""
