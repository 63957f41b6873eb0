"""The error every data reader raises on bad input."""


class DataError(ValueError):
    """Bad input: the message names the file, the record (line) and the field."""
