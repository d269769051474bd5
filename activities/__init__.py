"""Every side effect of the email workflow: audit, render, send."""
