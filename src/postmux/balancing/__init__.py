"""Choosing a member: policies, health, tiers. Pure functions of (state, now), tested without sockets."""
