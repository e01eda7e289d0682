"""mailx: a mail exchanger on Twisted."""
