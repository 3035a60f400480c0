"""The one exception type for mistakes a user can fix: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A bad input (config, path, value) described in one line that names what is wrong."""
