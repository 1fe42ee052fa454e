"""scopecast: engines."""
