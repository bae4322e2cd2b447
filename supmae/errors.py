"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class SupmaeError(Exception):
    """A problem with the user's input (paths, data, options), not a bug in supmae."""
