"""Bad input is reported as one line and exit status 2, before any training starts."""

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1  # a run (or a job of a sweep) diverged, ran out of memory, failed or did not finish
EXIT_TIMED_OUT = 124  # the scheduler's time limit ended a run whose requeues are used up (as timeout(1) exits)


class UserError(Exception):
    """A problem with the user's config, data or budget: the message names it and the fix."""


class BudgetUnreachable(UserError):
    """A budget this method cannot meet at its granularity (a LISA layer, a LoRA rank, an SMT block). In a
    sweep over several methods that point is skipped for this method, and said so, instead of failing."""
