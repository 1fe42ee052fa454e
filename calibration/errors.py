"""Errors raised by calibration fits."""


class CalibrationError(ValueError):
    """Data that cannot give a trustworthy calibration; the message says what to change."""
