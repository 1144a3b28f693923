"""The "torch" backend: ``kdfast.reference`` behind the backend contract of ``kdfast._contract``."""
