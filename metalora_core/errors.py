"""One exception type for everything a user can fix: the CLI prints its message without a traceback."""


class MetaLoRAError(Exception):
    """A problem with the user's input (file, layer, setting) described in words they can act on."""


class FingerprintMismatch(MetaLoRAError):
    """An identity adapter was trained against a different LoMD than the one it is used with."""
