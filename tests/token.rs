//! Token endpoint integration tests (over loopback HTTP).
