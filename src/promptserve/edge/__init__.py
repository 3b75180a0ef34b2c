"""What a request must pass before the app sees it: the connection's limits (``protocol``),
the head's and body's (``limits``) and the caller's key (``keys``)."""
