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

/// What a `tracing` subscriber writes, kept for a test to read: give
/// [`writer`](Self::writer) to `tracing_subscriber::fmt().with_writer(...)`.
#[derive(Clone, Default)]
pub(crate) struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl LogBuffer {
    /// A writer maker for the subscriber; what it writes lands here.
    pub(crate) fn writer(&self) -> impl Fn() -> Self + Send + Sync + 'static {
        let buffer = self.clone();
        move || buffer.clone()
    }

    /// What was written since the last `take`, taken out.
    pub(crate) fn take(&self) -> String {
        String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
    }
}

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
