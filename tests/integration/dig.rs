//! dig (in progress)
