"""Runs inside Spark tasks on executors; imports neither driver/ nor rank/."""
