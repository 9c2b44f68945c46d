"""Loggers: one small interface (:class:`BaseLogger`) and a fan-out (:class:`MultiLogger`)."""
