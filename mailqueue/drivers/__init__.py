"""Mail drivers: one small interface (`base`), one module per way of sending, and the factory
that builds the one a sender uses (`factory`)."""
