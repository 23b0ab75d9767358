"""Targets for tests that spawn a fresh interpreter: a module without heavy imports, so the child
starts in a fraction of a second instead of importing torch and the test module's dependencies."""
import os


def die_without_result(code, queue):
    os._exit(code)  # what the OOM killer looks like from the parent: no result, a bad exit code


def put_then_exit(value, queue):
    queue.put({"value": value})
