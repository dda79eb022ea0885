//! Device client.
