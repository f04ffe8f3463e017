"""Delivery: SMTP transactions toward members, connections, DSNs."""
