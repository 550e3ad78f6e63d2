//! core_e2e (in progress)
