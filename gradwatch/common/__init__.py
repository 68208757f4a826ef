"""Shared foundations: the exception tree, file and lock helpers, progress output, the version.

Imports: nothing else of gradwatch.
"""
