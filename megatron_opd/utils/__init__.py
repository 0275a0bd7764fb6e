"""Small shared utilities (process launching for tests and tools, logging helpers)."""
