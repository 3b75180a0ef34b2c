"""Errors that carry a message fit to show a user as one line."""


class InputError(ValueError):
    """Bad user input (a file, a column, a spec, a flag); the message names what is wrong."""


class Cancelled(Exception):
    """The caller cancelled the request."""
