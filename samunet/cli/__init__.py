"""Command-line entry points of samunet."""
