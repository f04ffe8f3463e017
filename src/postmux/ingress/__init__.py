"""Ingress: SMTP and HTTP in, one accept path to the spool."""
