"""Compatibility modules for code written against the original importer."""
