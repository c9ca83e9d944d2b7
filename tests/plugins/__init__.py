"""Plugin modules for tests, loaded with ``--plugin tests.plugins.<module>``."""
