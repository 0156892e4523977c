"""Before a byte of weights is read: what the hardware is, what fits where, and every known failure, with its fix."""
