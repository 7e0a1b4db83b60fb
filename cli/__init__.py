"""The `clinfed` command line: the top of the stack, wiring `simulations/`, `server/`, `client/`
and `common/` into commands a user runs. Nothing imports it."""
