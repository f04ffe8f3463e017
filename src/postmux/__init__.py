"""postmux: an outbound email gateway that spools durably and balances delivery across a farm of relays."""

__version__ = "0.1.0"
