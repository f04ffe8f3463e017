"""Sender reputation: what receivers will think of the mail, judged before it leaves."""
