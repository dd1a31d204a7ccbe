"""Representative inputs (built-in structured synthetic sets) and, later, activation statistics."""
