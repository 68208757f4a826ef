"""Shared foundations: errors, files and locks, progress output, the settings base, version.

Imports: nothing else of gradwatch.
"""
