"""The ground floor: what every side shares and that imports nothing above it (config, plan, wire
format, run directory, errors, faults, records, DP accounting, processes, Flower's internals)."""
