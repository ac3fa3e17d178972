"""streamer: streaming stateful inference for recurrent models over per-entity event streams."""

__version__ = "0.1.0"
