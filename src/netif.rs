//! netif (to be written)
