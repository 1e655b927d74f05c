"""The config schema: every key of every config group has a declared type and valid values, checked
before any weights load (see store.py for the map of conf/ to schemas, validate.py for the checks).

Kept import-free so that components can declare their fields with `schema.spec` without cycles.
"""
