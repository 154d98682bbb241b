"""Command-line interface; see ``dsv4 --help``."""
