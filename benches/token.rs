//! Token issuance bench.
fn main() {}
