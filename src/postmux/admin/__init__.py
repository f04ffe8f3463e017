"""The admin side: live control (control.py), reload (reload.py), the admin HTTP API (api.py) and the CLI's
client of it (client.py). It is given the running node's parts, never the App (DESIGN.md, rooms)."""
