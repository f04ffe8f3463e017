"""Scheduling: which pool takes a recipient, when it is due again, and handing ready work to delivery."""
