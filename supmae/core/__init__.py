"""What every layer may use: the error type, declared options, files written whole, and locks."""
