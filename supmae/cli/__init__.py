"""The command line: a table of commands, each a configuration declared by the layer that runs it, parsed,
layered (defaults < resumed checkpoint < config file < typed options) and checked before torch loads."""
