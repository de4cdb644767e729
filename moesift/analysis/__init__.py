"""Pure functions over traces: concentration, held-out coverage, locality, affinity, cache simulation."""
