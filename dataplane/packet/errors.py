"""The one exception the wire parsers raise."""


class DecodeError(ValueError):
    """Bytes that are not a well-formed header of the kind asked for.

    A subclass of ValueError so callers that only care about "bad input" can
    catch that; the dataplane catches DecodeError and counts a drop.
    """
