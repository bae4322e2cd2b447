"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class SupmaeError(ValueError):
    """A problem with the user's input (paths, data, options), not a bug in supmae. A ValueError, as Python's
    own functions report a bad argument, so the API's callers catch it as one."""
