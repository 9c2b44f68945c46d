"""Learning-rate schedules: pure functions of the step, applied through :class:`SchedulerAdapter`."""
