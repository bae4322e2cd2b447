"""How fast: timed windows, utilisation and provenance, and `supmae profile`, which names what bounds a run."""
