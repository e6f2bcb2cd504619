"""The resolved config: everything the workflow computes or checks about a config, in one object
(`resolve`), and the user commands that show it (`check`, `methods`)."""
