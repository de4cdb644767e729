"""Shared helpers, one of each: errors, output discipline, values, progress, identity, the HTML shell."""
