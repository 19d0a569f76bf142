"""tokenrelay: a streaming AI gateway."""

__version__ = "0.1.0"
