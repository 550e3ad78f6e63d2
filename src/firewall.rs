//! firewall (to be written)
