"""scopecast: bench."""
