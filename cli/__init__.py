"""Command-line tools, installed as ``mhla_stream.cli``."""
