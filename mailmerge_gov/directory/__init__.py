"""Directory consolidation: read old directories, resolve identities, assign addresses, plan, apply."""
