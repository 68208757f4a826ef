"""The version of gradwatch (read by the packaging too).

Imports: nothing.
"""

__version__ = "0.1.0"
