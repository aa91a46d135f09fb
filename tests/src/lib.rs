//! Helpers for the whole-system tests in `tests/tests/`: starting the programs as processes.
