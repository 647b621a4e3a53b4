"""The package's version, apart from its __init__ so that modules inside the package can
read it without importing the package's public API (and, through it, themselves)."""

__version__ = "0.1.0"
