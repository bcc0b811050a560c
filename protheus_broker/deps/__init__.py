"""Dependency gating: a balance unit takes no new session while a service it depends on
(DbAccess, LockServer, the license server) is down (seed 003)."""
