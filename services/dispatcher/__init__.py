"""dispatcher: tells a client which room addresses to connect to (DESIGN.md §1, §5)."""
