"""The exit statuses of every dreamfleet command (SPEC "Commands")."""

OK = 0  # everything succeeded
SOME_FAILED = 1  # the run finished, but some subjects or rows failed, each recorded with its reason
NOT_RUN = 2  # nothing was run: bad arguments, an unreadable or invalid manifest
