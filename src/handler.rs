//! handler (to be written)
