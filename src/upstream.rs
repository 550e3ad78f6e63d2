//! upstream (to be written)
