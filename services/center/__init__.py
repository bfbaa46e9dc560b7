"""center: the HTTP API for app servers and operators (DESIGN.md §5)."""
