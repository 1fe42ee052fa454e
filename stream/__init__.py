"""scopecast: stream."""
