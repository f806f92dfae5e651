//! Helpers shared by the unit tests of several modules.

use http::header::{HeaderMap, HeaderName};

/// A header map from `(name, value)` pairs, repeated names appended in order.
#[cfg_attr(not(feature = "proxy"), allow(dead_code))]
pub(crate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    map
}
