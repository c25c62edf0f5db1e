"""Self-supervised objectives as pure functions: token arrays + a seeded Generator -> training arrays."""
