"""The same ETA pipeline served other ways, for the side-by-side benchmark (`make bench`)."""
