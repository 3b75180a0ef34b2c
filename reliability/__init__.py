"""The reliability suite (``make reliability``): overload, faults, bad input and security,
measured against the real server; one JSON line of figures."""
