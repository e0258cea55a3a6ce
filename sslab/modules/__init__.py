"""Reusable nn pieces with no Lightning in them: heads, losses, EMA, schedules."""
