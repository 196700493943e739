"""Data preparation: synthetic demo datasets."""
