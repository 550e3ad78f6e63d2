//! robustness (in progress)
