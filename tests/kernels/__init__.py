"""The conformance suite: every registered kernel against the reference."""
