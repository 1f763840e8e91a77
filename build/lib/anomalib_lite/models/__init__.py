"""One folder per method; shared pieces live in `components`."""
